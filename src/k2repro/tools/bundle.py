"""Check a release bundle, and bring one into a store so that it replays there.

A bundle is untrusted input (docs/release-bundle.md, "Trust model"). `verify_bundle` checks
MANIFEST.json's own checksum, then every listed file's size and sha256, that no file is
missing or unlisted and that nothing is a symbolic link; with a public key, MANIFEST.sig too
(checksums prove integrity, anyone can recompute them; only the signature proves origin).
Each problem names its file.

`import_bundle` verifies, then validates everything it will read before it writes anything
(`plan_import`: run ids pass the run-id rule, every path is relative, inside the bundle and
listed, every row's `run_id` is its launch's), then builds `<store>/bundle-<head run id>/` in
a dot folder: one folder per launch of the chain (its tables, its DCP checkpoints under
`checkpoints/`) and the shipped data under `data/`. The paths a run recorded point at the
machine it trained on, so the import rewrites every config value that names a path to the
imported copy or to empty (`rewrite_config`), and `data_manifest.path`, `checkpoints.path`,
`runs.store_path`, recording each rewrite in an `import` event and in `_import.json`. The
run keeps its id, config hash and `source`, so `k2repro replay RUN` works there. The folder is
renamed into the store, then each launch's dot folder is renamed to its run id, parents
first: readers see a launch whole or not at all. Nothing is written outside that folder.
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
from k2repro.core.ids import check_run_id
from k2repro.errors import BadInputError
from k2repro.tools.export import (
    BUNDLE_FORMAT,
    BUNDLE_JSON,
    MANIFEST_JSON,
    SELF_ZERO,
    SIGNATURE,
    key_fingerprint,
)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- verify

def safe_relpath(rel: Any) -> bool:
    """A path a bundle may name: relative, POSIX, no `..`, no empty or dot parts."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not (len(rel) > 1 and rel[1] == ":")


def _linked(bundle: Path, rel: str) -> bool:
    """Whether `rel` or any folder on the way to it is a symbolic link (which could point
    anywhere: a bundle holds plain files and folders only)."""
    p = bundle
    for part in rel.split("/"):
        p = p / part
        if p.is_symlink():
            return True
    return False


def read_manifest(bundle: Path) -> dict[str, Any]:
    """MANIFEST.json, checked against its own sha256; BadInputError naming it otherwise."""
    path = Path(bundle) / MANIFEST_JSON
    if not Path(bundle).is_dir():
        raise BadInputError(f"bundle {bundle} does not exist")
    if not path.is_file() or path.is_symlink():
        raise BadInputError(f"{bundle} is not a k2repro bundle: no {MANIFEST_JSON}")
    raw = path.read_bytes()
    try:
        body = json.loads(raw)
        claimed = body["self_sha256"]
        files = body["files"]
        assert isinstance(files, dict) and isinstance(claimed, str)
        assert all(isinstance(v, dict) for v in files.values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError, RecursionError):
        raise BadInputError(f"{path}: corrupt (not the JSON a bundle manifest holds)") from None
    text = raw.decode()
    zeroed = text.replace(f'"self_sha256": "{claimed}"', f'"self_sha256": "{SELF_ZERO}"', 1)
    if zeroed == text or hashlib.sha256(zeroed.encode()).hexdigest() != claimed:
        raise BadInputError(f"{path}: changed (its sha256 differs from the one it records)")
    if body.get("format") != BUNDLE_FORMAT:
        raise BadInputError(f"{path}: format {body.get('format')!r}, this k2repro reads {BUNDLE_FORMAT}")
    return body


def load_public_key(path: str | Path) -> Any:
    """An ed25519 public key (PEM `-----BEGIN PUBLIC KEY-----` or an OpenSSH `ssh-ed25519 ...`
    line); BadInputError naming the file otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"--key {p}: cannot read the key ({exc.strerror})") from None
    key = None
    for loader in (serialization.load_pem_public_key, serialization.load_ssh_public_key):
        try:
            key = loader(raw)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"--key {p}: not an ed25519 public key (PEM or OpenSSH)")
    return key


def check_signature(bundle: Path, key: Any) -> dict[str, Any]:
    """MANIFEST.sig against `key` (an Ed25519PublicKey). Returns {ok, problem, fingerprint}:
    a missing, malformed or foreign signature is a problem, never an exception."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    want = key_fingerprint(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    out: dict[str, Any] = {"ok": False, "key": want, "signed_by": None, "problem": None}
    sig_path = bundle / SIGNATURE
    if not sig_path.is_file() or sig_path.is_symlink():
        out["problem"] = "missing: the bundle is not signed"
        return out
    try:
        body = json.loads(sig_path.read_bytes())
        sig = bytes.fromhex(body["signature"])
        out["signed_by"] = body.get("fingerprint")
        assert body.get("algorithm") == "ed25519"
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        out["problem"] = "corrupt (not the JSON an ed25519 signature holds)"
        return out
    try:
        key.verify(sig, (bundle / MANIFEST_JSON).read_bytes())
    except InvalidSignature:
        out["problem"] = (f"does not verify with key {want}"
                          + (f" (it names key {out['signed_by']})" if out["signed_by"] not in (None, want) else "")
                          + ": signed by someone else, or MANIFEST.json changed since")
        return out
    out["ok"] = True
    return out


def verify_bundle(bundle: str | Path, key: str | Path | Any | None = None) -> dict[str, Any]:
    """Every file against MANIFEST.json, and with `key` (a public key file or key) the
    signature too. Returns {ok, problems: [{file, problem}], files, bytes, signature}.
    Raises BadInputError only when the folder is not a bundle at all (or the key is bad).

    Integrity only proves the files match MANIFEST.json, which anyone can recompute; origin
    needs the signature (docs/release-bundle.md)."""
    from k2repro.core.hashing import sha256_file

    bundle = Path(bundle)
    pub = load_public_key(key) if isinstance(key, str | Path) else key
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
        if not safe_relpath(rel):
            problems.append({"file": rel, "problem": "not a plain relative path inside the bundle"})
            continue
        f = bundle / rel
        if _linked(bundle, rel):
            problems.append({"file": rel, "problem": "a symbolic link (a bundle holds plain files only)"})
            continue
        if not f.is_file():
            problems.append({"file": rel, "problem": "missing"})
            continue
        size = f.stat().st_size
        total += size
        try:
            want_bytes, want_sha = int(info["bytes"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError):
            problems.append({"file": rel, "problem": "its manifest entry is corrupt"})
            continue
        if size != want_bytes:
            problems.append({"file": rel, "problem": f"size {size} bytes, the manifest says {info['bytes']}"})
        elif sha256_file(f) != want_sha:
            problems.append({"file": rel, "problem": "sha256 differs from the manifest"})
    for dirpath, dirnames, filenames in os.walk(bundle):  # never follows a link
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            f = here / name
            rel = f.relative_to(bundle).as_posix()
            if f.is_symlink():
                if rel not in files:
                    problems.append({"file": rel, "problem": "a symbolic link (a bundle holds plain files only)"})
            elif name in filenames and rel not in files and rel not in (MANIFEST_JSON, SIGNATURE):
                problems.append({"file": rel, "problem": "not listed in the manifest"})
    signature: dict[str, Any] | None = None
    if pub is not None:
        signature = check_signature(bundle, pub)
        if not signature["ok"]:
            problems.append({"file": SIGNATURE, "problem": signature["problem"]})
    elif (bundle / SIGNATURE).is_file():
        try:
            signature = {"ok": None, "signed_by": json.loads((bundle / SIGNATURE).read_bytes()).get("fingerprint"),
                         "problem": "not checked: pass --key with the publisher's public key"}
        except (ValueError, AttributeError, RecursionError):
            signature = {"ok": None, "signed_by": None, "problem": "not checked (and not readable)"}
    return {"bundle": str(bundle), "ok": not problems, "problems": problems, "files": len(files), "bytes": total,
            "run": body.get("run"), "runs": body.get("runs", []), "signature": signature}


# ----------------------------------------------------------------------------- import

def _replace_column(tbl: pa.Table, name: str, values: list) -> pa.Table:
    import pyarrow as pa

    i = tbl.schema.get_field_index(name)
    return tbl.set_column(i, tbl.schema.field(i), pa.array(values, type=tbl.schema.field(i).type))


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
    return p if safe_relpath(rel) and not _linked(bundle, rel) and p.is_dir() else None


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


def plan_import(bundle: Path, info: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """Everything import reads, checked before anything is written: run ids, checkpoint and
    data paths (relative, inside the bundle, listed in the verified manifest, no link), every
    table segment readable and every row's `run_id` that of its launch (rows cannot be forged
    into another run's history), the config of every `runs` row JSON. Only the columns checked
    are read here (a bundle's tables can be large); the write reads each segment again, whole,
    and checks it again. Returns the plan: ids, checkpoints, artefacts, segment names, markers."""
    from k2repro.core.layout import RUN_MARKER, step_dirname

    ids = _run_ids(bundle, info)
    listed = set(files)

    def listed_under(rel: str) -> bool:
        return any(f.startswith(rel + "/") for f in listed)

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
    data = info.get("data") or {}
    artifacts: dict[str, str] = {}
    if data.get("shipped"):
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
    tables: dict[str, dict[str, list[str]]] = {}
    markers: dict[str, dict[str, Any]] = {}
    for rid in ids:
        tdir = _plain_dir(bundle, f"tables/{rid}")
        if tdir is None or not listed_under(f"tables/{rid}/runs"):
            raise _bad(bundle, f"tables/{rid}/runs: missing (every launch of the chain ships its tables)")
        try:
            marker = json.loads((tdir / RUN_MARKER).read_bytes())
            assert isinstance(marker, dict) and marker.get("run_id") == rid
        except (OSError, ValueError, AssertionError, RecursionError):
            raise _bad(bundle, f"tables/{rid}/{RUN_MARKER}: missing or not this launch's marker") from None
        markers[rid] = marker
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
        tables[rid] = got
    return {"ids": ids, "checkpoints": ckpts, "artifacts": artifacts, "tables": tables, "markers": markers}


#: Config keys that name paths of the machine the run trained on (the tokenizer is found
#: through `data.packed_dir`'s manifest, and by `k2repro data` under `data.work_dir`).
PATH_KEYS = ("data.packed_dir", "data.work_dir", "data.source", "ckpt.dir", "audit.store", "train.resume")


def _looks_absolute(v: Any) -> bool:
    return isinstance(v, str) and (v.startswith(("/", "~/")) or (len(v) > 2 and v[1] == ":" and v[2] in "/\\"))


def path_value(key: str, value: Any, ctx: dict[str, Any]) -> Any:
    """What a config value that names a path becomes in the importing store: the imported
    copy when the bundle ships it, the store for `audit.store`, else empty. Nothing outside
    the store stays named (the old values are in the `import` event)."""
    if key == "audit.store":
        return ctx["store"]
    if key == "data.packed_dir":
        return ctx["packed"] or ""
    if key == "data.work_dir":
        return ctx["data"] or ""
    if key == "train.resume":
        if value:
            for rid, step_dir, new in ctx["resumes"]:
                if Path(str(value)).name == step_dir and rid in str(value):
                    return new
        return ""
    if key in PATH_KEYS or _looks_absolute(value):
        return ""
    return value


def _walk_paths(cfg: Any, prefix: str, ctx: dict[str, Any], out: dict[str, list]) -> Any:
    if isinstance(cfg, dict):
        return {k: _walk_paths(v, f"{prefix}.{k}" if prefix else str(k), ctx, out) for k, v in cfg.items()}
    if prefix in PATH_KEYS or _looks_absolute(cfg):
        new = path_value(prefix, cfg, ctx)
        if new != cfg:
            out[prefix] = [cfg, new]
        return new
    return cfg


def rewrite_config(cfg: dict[str, Any], ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list]]:
    """The config with every path value moved to the store; returns (config, {key: [old, new]})."""
    changes: dict[str, list] = {}
    return _walk_paths(cfg, "", ctx, changes), changes


def _rewrite(table: str, tbl: pa.Table, ctx: dict[str, Any], ckpt_paths: dict[int, str],
             artifact_paths: dict[str, str], changes: dict[str, list]) -> pa.Table:
    """The paths of one launch's table, moved to the imported copies (every row its own)."""
    if tbl.num_rows == 0:
        return tbl
    if table == "runs":
        cfgs = []
        for text in tbl.column("config_json").to_pylist():
            if not text:
                cfgs.append(text)
                continue
            cfg, ch = rewrite_config(json.loads(text), ctx)
            changes.update(ch)
            cfgs.append(json.dumps(cfg, sort_keys=True, default=str))
        tbl = _replace_column(tbl, "config_json", cfgs)
        return _replace_column(tbl, "store_path", [ctx["store"]] * tbl.num_rows)
    if table == "hparams":
        keys = tbl.column("key").to_pylist()
        vals = []
        for k, v in zip(keys, tbl.column("value").to_pylist()):
            new = path_value(k, v, ctx) if (k in PATH_KEYS or _looks_absolute(v)) else v
            vals.append(None if new is None else str(new))
        return _replace_column(tbl, "value", vals)
    if table == "data_manifest":
        arts = tbl.column("artifact").to_pylist()
        return _replace_column(tbl, "path", [artifact_paths.get(a, p) for a, p in
                                             zip(arts, tbl.column("path").to_pylist())])
    if table == "checkpoints":
        steps = tbl.column("step").to_pylist()
        return _replace_column(tbl, "path", [ckpt_paths.get(int(s), "") if s is not None else "" for s in steps])
    return tbl


def import_bundle(bundle: str | Path, store_root: str | Path | None = None,
                  progress: Progress | None = None, key: str | Path | None = None) -> dict[str, Any]:
    """Verify (and with `key`, check the signature), validate everything the import reads,
    then add the bundle's launches to the store; returns what was imported and every path
    rewrite. Nothing is written before every check passed, and nothing outside
    `<store>/bundle-<head>/` is written at all."""
    from k2repro.audit.store import default_store, open_store
    from k2repro.audit.storemeta import ensure_store
    from k2repro.audit.versions import SchemaTooNew
    from k2repro.audit.writer import (
        RUN_MARKER,
        atomic_write_bytes,
        to_arrow,
        write_segment,
    )
    from k2repro.core.layout import step_dirname

    say = progress or (lambda _m: None)
    bundle = Path(bundle)
    pub = load_public_key(key) if key is not None else None
    check = verify_bundle(bundle, pub)
    if not check["ok"]:
        p = check["problems"][0]
        more = f" (and {len(check['problems']) - 1} more)" if len(check["problems"]) > 1 else ""
        raise BadInputError(f"bundle {bundle} failed verification: {p['file']}: {p['problem']}{more}; "
                            f"nothing imported")
    say(f"verified {check['files']} files ({check['bytes'] / 1e6:.2f} MB)"
        + (f", signed by key {check['signature']['key']}" if pub is not None else ""))
    manifest = read_manifest(bundle)
    info = read_bundle_json(bundle)
    if info["schema_version"] > S.SCHEMA_VERSION:
        raise SchemaTooNew(f"bundle {bundle} was exported with audit schema version {info['schema_version']}, "
                           f"newer than this k2repro's {S.SCHEMA_VERSION}: upgrade k2repro to import it")
    plan = plan_import(bundle, info, manifest["files"])
    chain = plan["ids"]
    head = info["run"]["head"]
    root = Path(store_root) if store_root is not None else default_store()
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
    final_abs = final.resolve()
    store_abs = str(root.resolve())
    data = info.get("data") or {}
    shipped_data = bool(data.get("shipped"))
    ctx = {"store": store_abs, "packed": str(final_abs / "data" / "packed") if shipped_data else None,
           "data": str(final_abs / "data") if shipped_data else None,
           "resumes": [(rid, step_dirname(step), str(final_abs / rid / "checkpoints" / step_dirname(step)))
                       for rid, step, _ in plan["checkpoints"]]}
    stage = root / f".k2imp-{secrets.token_hex(4)}"
    stage.mkdir()
    rewrites: dict[str, dict[str, list]] = {}
    try:
        artifact_paths: dict[str, str] = {}
        if shipped_data:
            shutil.copytree(bundle / "data", stage / "data", symlinks=True)
            artifact_paths = {a: str(final_abs / rel) for a, rel in plan["artifacts"].items()}
        now = datetime.now(timezone.utc)
        for rid in chain:
            rdir = stage / f".{rid}"
            rdir.mkdir()
            ckpt_paths: dict[int, str] = {}
            for crid, step, dcp in plan["checkpoints"]:
                if crid != rid:
                    continue
                dst = rdir / "checkpoints" / step_dirname(step)
                shutil.copytree(bundle / dcp, dst, symlinks=True)
                ckpt_paths[step] = str(final_abs / rid / "checkpoints" / step_dirname(step))
            changes: dict[str, list] = {}
            for table, segs in sorted(plan["tables"][rid].items()):
                for seg in segs:
                    tbl = _segment(bundle, f"tables/{rid}/{table}/{seg}", rid, table, full=True)
                    write_segment(rdir / table, seg, _rewrite(table, tbl, ctx, ckpt_paths, artifact_paths, changes))
            rewrites[rid] = changes
            event = to_arrow("events", {
                "time": [now], "rank": [0], "step": [None], "kind": ["import"], "severity": ["info"],
                "detail": [json.dumps({"bundle": str(bundle.resolve()), "bundle_format": BUNDLE_FORMAT,
                                       "manifest_self_sha256": manifest["self_sha256"],
                                       "signed_by": check["signature"]["key"] if pub is not None else None,
                                       "rewrites": changes, "checkpoints": sorted(ckpt_paths)},
                                      sort_keys=True, default=str)]}, rid)
            write_segment(rdir / "events", "import-00000000.parquet", event)
            marker = dict(plan["markers"][rid])
            marker.update(imported_from=str(bundle.resolve()), imported_at=now.isoformat())
            atomic_write_bytes(rdir / RUN_MARKER, json.dumps(marker).encode())
        record = {"bundle": str(bundle.resolve()), "imported_at": now.isoformat(), "runs": chain, "head": head,
                  "rewrites": rewrites, "data": "data/" if shipped_data else None,
                  "signed_by": check["signature"]["key"] if pub is not None else None}
        (stage / "_import.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
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
    return {"run_ids": chain, "head": head, "store": str(root), "folder": str(final),
            "rewrites": rewrites, "checkpoints": [step for _, step, _ in plan["checkpoints"]],
            "files_verified": check["files"], "signed_by": check["signature"]["key"] if pub is not None else None}


__all__ = ["verify_bundle", "read_manifest", "import_bundle", "plan_import", "read_bundle_json", "check_signature",
           "load_public_key", "rewrite_config", "PATH_KEYS"]
