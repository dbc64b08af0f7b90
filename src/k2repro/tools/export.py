"""`k2repro export`: publish a run the way LLM360 publishes K2, as one self-describing folder.

A bundle holds the resolved config, the environment facts, the data manifest, the data order
(sample ids of every step), the run's tables (Parquet, laid out as a small store, plus a DuckDB
file of views), the selected checkpoints as safetensors weights *and* as the DCP folders that
replay needs (optimizer state, RNG, sampler), the packed training data, evals, the forensics
report and a generated README (model card with a loss figure). `MANIFEST.json` holds the
sha256 of every file; docs/release-bundle.md describes the layout and what it guarantees.

A lineage chain (resumes, guard rollbacks) is exported as one logical run: every launch's own
rows are kept (so the bundle imports as the same runs), and `logical/*.parquet` stitch them,
a child's steps superseding its parent's from `resumed_from_step + 1` on (the store's
`lineage_steps` rule).

The bundle is built in a dot folder beside `--out` and renamed into place: a crash leaves no
half bundle under the final name. `--out` inside the store is refused (the store's globs
would read the bundle's tables as rows of the run). What replay, batch and eval need ships
(the packed data and its tokenizer) or the export fails naming it; an incomplete stored run
is refused unless `--allow-incomplete` says so in the bundle; a run k2repro did not train
ships without data and checkpoints, said once up front. `--sign KEY` adds MANIFEST.sig, an
ed25519 signature of MANIFEST.json: checksums prove integrity, only a signature proves origin.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.audit.redact import scrub_obj, scrub_text
from k2repro.core.layout import step_dirname
from k2repro.errors import BadInputError, CheckpointError, VerificationFailed
from k2repro.tools import lineage

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from k2repro.audit.store import Store

BUNDLE_FORMAT = "k2repro-bundle-v1"
#: What a bundle of this k2repro holds, within the same format: 1 the first release; 2 adds
#: the tokenizer under data/, the optional MANIFEST.sig and bundle.json's `incomplete`. Every
#: addition is optional to a reader, so version-1 bundles import and verify unchanged.
BUNDLE_VERSION = 2
BUNDLE_JSON = "bundle.json"
MANIFEST_JSON = "MANIFEST.json"
#: Tables with a `step` column: stitched along a lineage chain.
STEP_TABLES = ("steps", "layer_stats", "sample_stats", "checkpoints", "evals")
Progress = Callable[[str], None]


def _arrow(store: Store, query: str, params: list) -> pa.Table:
    import warnings

    res = store.execute(query, params)
    with warnings.catch_warnings():  # "an extra copy of the rows": small tables, and it keeps the retry
        warnings.simplefilter("ignore")
        return res.to_arrow_table() if hasattr(res, "to_arrow_table") else res.fetch_arrow_table()


def parse_selection(text: str) -> tuple[str, int]:
    """'all' | 'last' | 'none' | 'every:N' -> (kind, N)."""
    t = (text or "").strip().lower()
    if t in ("all", "last", "none"):
        return t, 0
    if t.startswith("every:"):
        try:
            n = int(t.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return "every", n
    raise BadInputError(f"--checkpoints {text!r}: expected all, last, none or every:N (N >= 1)")


def select_steps(steps: list[int], kind: str, n: int) -> list[int]:
    if kind == "none" or not steps:
        return []
    if kind == "last":
        return [max(steps)]
    if kind == "every":
        return [s for s in steps if s % n == 0]
    return sorted(steps)


# ----------------------------------------------------------------------------- the logical run

def logical_chain(store: Store, ref: str) -> list[dict[str, Any]]:
    """The launches that make up the logical run `ref` belongs to, root first: its ancestors
    (through `parent_run_id`, not across a replay) and its descendants while each has exactly
    one child that is not a replay. Each entry has `cut`: the last step of this launch that
    the logical run keeps (None: all)."""
    rid = store.resolve_run_id(ref)
    cols = ("run_id", "name", "parent_run_id", "resumed_from_step", "source", "status", "config_json",
            "config_hash", "world_size", "started_at", "ended_at")
    rows = {r[0]: dict(zip(cols, r)) for r in store.execute(f"SELECT {', '.join(cols)} FROM runs").fetchall()}
    me = rows[rid]
    chain = [me]
    while (chain[0].get("source") or "train") != "replay" and chain[0]["parent_run_id"] in rows:
        parent = rows[chain[0]["parent_run_id"]]
        if parent in chain:
            break
        chain.insert(0, parent)
    while (chain[-1].get("source") or "train") != "replay":
        kids = sorted(r["run_id"] for r in rows.values() if r["parent_run_id"] == chain[-1]["run_id"]
                      and (r.get("source") or "train") == "train")
        if not kids:
            break
        if len(kids) > 1:
            raise BadInputError(f"run {chain[-1]['run_id']} has several continuations ({', '.join(kids)}): "
                                f"export the one that heads the logical run")
        chain.append(rows[kids[0]])
    for i, r in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else None
        r["cut"] = None if nxt is None or nxt["resumed_from_step"] is None else int(nxt["resumed_from_step"])
        if r["status"] == "running":
            raise BadInputError(f"run {r['run_id']} is still running: export it when it has ended")
    return chain


def _stitch(per_run: dict[str, pa.Table], chain: list[dict[str, Any]]) -> pa.Table | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for r in chain:
        t = per_run.get(r["run_id"])
        if t is None or t.num_rows == 0:
            continue
        if r["cut"] is not None:
            t = t.filter(pc.less_equal(t.column("step"), r["cut"]))
        parts.append(t)
    if not parts:
        return None
    out = pa.concat_tables(parts)
    return out.take(pc.sort_indices(out, [("step", "ascending")]))


# ----------------------------------------------------------------------------- pieces

def _write_parquet(tbl: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    from k2repro.audit.redact import scrub_table
    from k2repro.audit.storemeta import COMPRESSION

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(scrub_table(tbl), path, compression=COMPRESSION)  # a store from before by-value scrubbing


def _order_by(table: str) -> str:
    names = S.column_names(table)
    keys = [k for k in ("step", "rank", "batch_pos", "param", "metric", "time", "key") if k in names]
    return f" ORDER BY {', '.join(keys)}" if keys else ""


def export_tables(store: Store, chain: list[dict[str, Any]], dest: Path, with_samples: bool
                  ) -> tuple[dict[str, dict[str, pa.Table]], dict[str, int]]:
    """`tables/<run_id>/<table>/r0-00000000.parquet` for every launch (a store of its own:
    `_run.json` markers too), in the explicit schema. Returns the tables and row counts."""
    from k2repro.audit.views import RAW_NAMES, ident
    from k2repro.audit.writer import write_run_marker

    got: dict[str, dict[str, pa.Table]] = {}
    counts: dict[str, int] = {}
    for r in chain:
        rid = r["run_id"]
        rdir = dest / "tables" / rid
        rdir.mkdir(parents=True, exist_ok=True)
        write_run_marker(rdir, rid)
        for table in S.TABLES:
            if table == "sample_stats" and not with_samples:
                continue
            schema = S.arrow_schema(table)
            cols = ", ".join(ident(c) for c in schema.names)
            tbl = _arrow(store, f"SELECT {cols} FROM {ident(RAW_NAMES[table])} WHERE run_id = ?{_order_by(table)}",
                         [rid]).cast(schema)
            got.setdefault(table, {})[rid] = tbl
            counts[table] = counts.get(table, 0) + tbl.num_rows
            if tbl.num_rows:
                _write_parquet(tbl, rdir / table / "r0-00000000.parquet")
    return got, counts


def _find_packed(cfg: dict[str, Any], manifest_rows: list[tuple]) -> Path | None:
    """The packed folder the run trained on: `data.packed_dir` as configured (relative to the
    working directory), else the folder of the recorded `packed/train.bin`."""
    cands = []
    pd = (cfg.get("data") or {}).get("packed_dir")
    if pd:
        cands.append(Path(pd))
    for artifact, path, _ in manifest_rows:
        if artifact == "packed/train.bin" and path:
            cands.append(Path(path).parent)
    for c in cands:
        if (c / "manifest.json").is_file():
            return c
    return None


def _own_file(rel: str) -> bool:
    """A packed manifest lists its own files relative to the packed folder (`train.bin`) and
    the artefacts of earlier stages relative to the packed folder's *parent*
    (`tokenizer/tokenizer.json`, `dedup/train.jsonl`; `tokenizer_relative_to`)."""
    return "/" not in rel and "\\" not in rel


def _inside_dir(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def ship_data(store: Store, chain: list[dict[str, Any]], dest: Path) -> dict[str, Any]:
    """Copy the packed training data and the tokenizer it was made with to `data/` (the same
    layout as the run's: `data/packed/`, `data/<tokenizer path>`), and check every copied file
    against the packed manifest and the run's recorded sha256. What `batch`, `eval` and
    `replay` need must ship: a tokenizer the manifest names but that is not here, or that
    changed, stops the export (exit 2) instead of leaving a bundle that fails later. Artefacts
    of earlier stages (corpus, dedup output) are named, not shipped."""
    from k2repro.core.hashing import sha256_file

    root = chain[0]
    cfg = json.loads(root["config_json"] or "{}")
    rows = store.execute("SELECT DISTINCT artifact, path, sha256 FROM data_manifest WHERE run_id = ? ORDER BY 1",
                         [root["run_id"]]).fetchall()
    src = _find_packed(cfg, rows)
    if src is None:
        raise BadInputError(f"the packed data of run {root['run_id']} is not here "
                            f"(data.packed_dir={(cfg.get('data') or {}).get('packed_dir')!r}, relative to the "
                            f"working directory): run from there, or pass --no-data (the bundle then cannot replay)")
    data = dest / "data"
    packed = data / "packed"
    shutil.copytree(src, packed, ignore=shutil.ignore_patterns(".*"))
    pman = json.loads((packed / "manifest.json").read_text())
    recorded = {a: s for a, _, s in rows}
    tok_rel = pman.get("tokenizer")
    tok_sha = pman.get("tokenizer_sha256")
    wanted: dict[str, dict[str, Any]] = {}  # bundle-relative path -> artefact row
    not_shipped: list[str] = []
    for a in pman.get("artifacts", []):
        rel = a.get("path")
        if not rel:
            continue
        if _own_file(rel):
            wanted[f"packed/{rel}"] = {**a, "_source": src / rel}
        elif tok_rel and rel == tok_rel:
            wanted[rel] = {**a, "_source": src.parent / rel}
        else:
            not_shipped.append(a.get("artifact") or rel)
    if tok_rel and tok_rel not in wanted:  # named by the manifest but not listed as an artefact
        wanted[tok_rel] = {"artifact": "tokenizer/tokenizer.json", "path": tok_rel, "sha256": tok_sha,
                           "_source": src.parent / tok_rel}
    artifacts = []
    for rel, a in sorted(wanted.items()):
        target, source = data / rel, Path(a["_source"])
        if os.path.isabs(rel) or not _inside_dir(target, data):
            shutil.rmtree(data, ignore_errors=True)
            raise BadInputError(f"{src / 'manifest.json'}: artefact {a['artifact']} lies at {rel!r}, outside the "
                                f"folder beside the packed data: the bundle cannot ship it (move the tokenizer next "
                                f"to the packed folder and re-pack, or pass --no-data)")
        if not target.is_file():
            if not source.is_file():
                shutil.rmtree(data, ignore_errors=True)
                raise BadInputError(f"{src / 'manifest.json'} names {a['artifact']} at {source}, which is not here: "
                                    f"the bundle cannot ship it (batch, eval and replay need it); restore it, or "
                                    f"pass --no-data")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        sha = sha256_file(target)
        checks = [(a.get("sha256"), f"{src / 'manifest.json'}"),
                  (recorded.get(a["artifact"]), f"the data manifest of run {root['run_id']}")]
        if rel == tok_rel:
            checks.append((tok_sha, f"the tokenizer_sha256 of {src / 'manifest.json'}"))
        for want, where in checks:
            if want and sha != want:
                shutil.rmtree(data, ignore_errors=True)
                raise BadInputError(f"data artefact {a['artifact']} ({source}) changed since the run: its "
                                    f"sha256 differs from {where}")
        artifacts.append({"artifact": a["artifact"], "bundle_path": target.relative_to(dest).as_posix(),
                          "sha256": sha, "bytes": target.stat().st_size})
    for r in chain[1:]:  # every launch of the chain trained on the same data
        for artifact, _, sha in store.execute(
                "SELECT artifact, path, sha256 FROM data_manifest WHERE run_id = ?", [r["run_id"]]).fetchall():
            mine = next((x for x in artifacts if x["artifact"] == artifact), None)
            if mine is not None and sha and sha != mine["sha256"]:
                raise BadInputError(f"run {r['run_id']} of the chain trained on other data ({artifact} differs)")
    n_samples = int(pman["splits"]["train"]["n_samples"])
    total = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    return {"shipped": True, "source": str(src), "packed_dir": "data/packed", "artifacts": artifacts,
            "tokenizer": f"data/{tok_rel}" if tok_rel else None, "not_shipped": sorted(not_shipped),
            "bytes": total, "n_samples": n_samples}


def data_order(store: Store, chain: list[dict[str, Any]], steps: pa.Table | None,
               n_samples: int | None, samples: dict[str, pa.Table] | None) -> tuple[pa.Table | None, dict[str, Any]]:
    """Sample ids of every logical step, in batch order. Recomputed from (seed, samples,
    step, deferrals) (docs/architecture.md, "Reproducibility rules") and checked against the recorded `batch_hash` of
    every step; from `sample_stats` (ordered by rank) when the data is not at hand."""
    import numpy as np
    import pyarrow as pa

    from k2repro.data.loader import StepSampler, batch_hash, data_position

    if steps is None or steps.num_rows == 0:
        return None, {"source": None, "steps": 0}
    st = steps.to_pydict()
    owner = dict(zip(st["step"], st["run_id"]))
    hashes = dict(zip(st["step"], st["batch_hash"]))
    cols: dict[str, list] = {"step": [], "run_id": [], "data_position": [], "batch_pos": [], "sample_id": []}
    need = ("seed", "global_batch_size", "max_steps")
    cfgs = {r["run_id"]: json.loads(r["config_json"] or "{}").get("train") or {} for r in chain}
    if n_samples and all(all(k in c for k in need) for c in cfgs.values()):
        samplers: dict[str, tuple[Any, list[int]]] = {}
        for r in chain:
            t = cfgs[r["run_id"]]
            s = StepSampler(int(t["seed"]), n_samples, int(t["global_batch_size"]), int(t["max_steps"]))
            s.deferred = lineage.deferred_at(store, r["run_id"])
            samplers[r["run_id"]] = (s, s.deferred)
        checked = 0
        for step in sorted(owner):
            s, deferred = samplers[owner[step]]
            ids = s.ids(step)
            if hashes.get(step) is not None:
                if batch_hash(ids) != hashes[step]:
                    raise VerificationFailed(f"data order of step {step} (run {owner[step]}) does not match its "
                                             f"recorded batch_hash: the shipped data or the deferrals differ")
                checked += 1
            n = len(ids)
            cols["step"] += [step] * n
            cols["run_id"] += [owner[step]] * n
            cols["data_position"] += [data_position(step, deferred)] * n
            cols["batch_pos"] += list(range(n))
            cols["sample_id"] += ids.tolist()
        info = {"source": "recomputed", "steps": len(owner), "batch_hash_checked": checked}
    elif samples:
        for r in chain:
            t = samples.get(r["run_id"])
            if t is None or t.num_rows == 0:
                continue
            d = t.select(["step", "rank", "sample_id"]).to_pydict()
            order = np.lexsort((np.arange(len(d["step"])), np.asarray(d["rank"]), np.asarray(d["step"])))
            pos: dict[int, int] = {}
            for i in order:
                step = d["step"][i]
                if owner.get(step) != r["run_id"]:
                    continue
                cols["step"].append(step)
                cols["run_id"].append(r["run_id"])
                cols["data_position"].append(None)
                cols["batch_pos"].append(pos.get(step, 0))
                cols["sample_id"].append(d["sample_id"][i])
                pos[step] = pos.get(step, 0) + 1
        if not cols["step"]:
            return None, {"source": None, "steps": 0, "note": "the run logged no sample ids: no data order"}
        info = {"source": "sample_stats", "steps": len(set(cols["step"])),
                "note": "order within a step: by rank, then as logged"}
    else:
        return None, {"source": None, "steps": 0, "note": "neither the data nor sample_stats: no data order"}
    tbl = pa.table({
        "step": pa.array(cols["step"], pa.int64()), "run_id": pa.array(cols["run_id"], pa.string()),
        "data_position": pa.array(cols["data_position"], pa.int64()),
        "batch_pos": pa.array(cols["batch_pos"], pa.int32()), "sample_id": pa.array(cols["sample_id"], pa.int64())})
    return tbl, info


def to_safetensors(dcp_dir: Path, out: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The model weights of a DCP checkpoint (no optimizer state) as one safetensors file."""
    import warnings

    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # loads in this one process, without a process group
        warnings.simplefilter("ignore")
        sd = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(dcp_dir))["model"]
    tensors = {k: v.detach().contiguous() for k, v in sorted(sd.items())}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return {"n_params": int(sum(t.numel() for t in tensors.values())), "n_tensors": len(tensors),
            "dtype": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})}


def export_checkpoints(store: Store, chain: list[dict[str, Any]], logical_ckpts: pa.Table | None,
                       dest: Path, kind: str, n: int, say: Progress) -> tuple[list[dict[str, Any]], list[str]]:
    from k2repro.core.ckpt_manifest import verify_checkpoint
    from k2repro.core.hashing import sha256_file

    notes: list[str] = []
    if logical_ckpts is None or kind == "none":
        return [], notes
    rows = logical_ckpts.select(["step", "run_id", "path", "manifest_sha256"]).to_pylist()
    located = []
    for r in rows:
        cfg = json.loads(next(c["config_json"] for c in chain if c["run_id"] == r["run_id"]) or "{}")
        base = (cfg.get("ckpt") or {}).get("dir") or None
        where = lineage.checkpoint_dir(store, r["run_id"], int(r["step"]), r["path"], base)
        if where is None:
            notes.append(f"checkpoint of step {r['step']} (run {r['run_id']}) is gone (pruned?): not exported")
            continue
        located.append((int(r["step"]), r["run_id"], where, r["manifest_sha256"]))
    chosen = set(select_steps([s for s, *_ in located], kind, n))
    out = []
    for step, rid, where, msha in located:
        if step not in chosen:
            continue
        manifest = verify_checkpoint(where)
        if int(manifest.get("step", -1)) != step:
            raise CheckpointError(f"checkpoint {where} holds step {manifest.get('step')}, not {step}")
        if msha and sha256_file(where / "manifest.json") != msha:
            raise CheckpointError(f"checkpoint {where}: manifest.json differs from the one run {rid} recorded")
        name = step_dirname(step)
        dcp = dest / "dcp" / rid / name
        shutil.copytree(where, dcp)
        st = dest / "weights" / f"{name}.safetensors"
        say(f"checkpoint of step {step}: DCP copied, converting weights to safetensors")
        info = to_safetensors(dcp, st, {"format": "k2repro", "run_id": rid, "step": str(step),
                                         "config_hash": str(manifest.get("config_hash", ""))})
        out.append({"step": step, "run_id": rid, "dcp": dcp.relative_to(dest).as_posix(),
                    "dcp_manifest_sha256": sha256_file(dcp / "manifest.json"),
                    "safetensors": st.relative_to(dest).as_posix(), "safetensors_sha256": sha256_file(st),
                    "safetensors_bytes": st.stat().st_size, "world_size": manifest.get("world_size"), **info})
    return out, notes


def write_bundle_duckdb(dest: Path, have: dict[str, bool], logical: list[str]) -> None:
    """`k2repro.duckdb`: the store's views over `tables/` and `logical_*` views, with paths
    relative to the bundle (open it from the bundle folder, or set `file_search_path`)."""
    import duckdb

    from k2repro.audit.views import all_view_sql, ident, sql_literal

    tmp = dest / f".k2repro.duckdb.{secrets.token_hex(3)}.tmp"
    con = duckdb.connect(str(tmp), config={"file_search_path": str(dest.resolve())})
    try:
        for stmt in all_view_sql("tables/", have, explicit=True):
            con.execute(stmt)
        for name in logical:
            con.execute(f"CREATE OR REPLACE VIEW {ident('logical_' + name)} AS SELECT * FROM "
                        f"read_parquet({sql_literal(f'logical/{name}.parquet')})")
        if (dest / "data" / "order.parquet").exists():
            con.execute("CREATE OR REPLACE VIEW data_order AS SELECT * FROM read_parquet('data/order.parquet')")
        con.execute(f"CREATE OR REPLACE VIEW k2repro_meta AS SELECT {S.SCHEMA_VERSION} AS schema_version, "
                    f"'{BUNDLE_FORMAT}' AS bundle_format")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    wal = Path(str(tmp) + ".wal")
    if wal.exists():
        wal.unlink()
    os.replace(tmp, dest / "k2repro.duckdb")


def loss_figure(steps: pa.Table | None, chain: list[dict[str, Any]], ckpts: list[dict[str, Any]],
                evals: pa.Table | None, out: Path) -> bool:
    """figures/loss.png: loss and grad norm over the logical run, resume points and exported
    checkpoints marked."""
    if steps is None or steps.num_rows == 0:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = steps.select(["step", "loss", "grad_norm"]).to_pydict()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, constrained_layout=True)
    a1.plot(d["step"], d["loss"], lw=1.2, label="train loss")
    if evals is not None and evals.num_rows:
        e = [(s, v) for s, m, v in zip(*evals.select(["step", "metric", "value"]).to_pydict().values())
             if m == "val/loss" and v is not None]
        if e:
            a1.plot([s for s, _ in e], [v for _, v in e], "o-", ms=4, lw=1, label="val/loss")
    a2.plot(d["step"], d["grad_norm"], lw=1, color="tab:orange", label="grad norm")
    for r in chain[1:]:
        if r["resumed_from_step"] is not None:
            for a in (a1, a2):
                a.axvline(r["resumed_from_step"], color="grey", ls="--", lw=0.8)
    for c in ckpts:
        a1.axvline(c["step"], color="tab:green", ls=":", lw=0.8)
    a1.set_ylabel("loss")
    a2.set_ylabel("grad norm")
    a2.set_xlabel("step")
    a1.legend(loc="upper right", fontsize=8)
    a1.set_title(f"{chain[-1]['name'] or chain[-1]['run_id']}: dotted = exported checkpoints, dashed = resumes")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- manifest

def file_entries(dest: Path) -> dict[str, dict[str, Any]]:
    from k2repro.core.hashing import sha256_file

    out = {}
    for f in sorted(dest.rglob("*")):
        if f.is_file() and f.name != MANIFEST_JSON:
            rel = f.relative_to(dest).as_posix()
            out[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


SELF_ZERO = "0" * 64


def manifest_bytes(body: dict[str, Any]) -> bytes:
    """MANIFEST.json carries the sha256 of its own bytes (with that field zeroed), so a flipped
    byte in it is caught and blamed on it, not on a file it lists."""
    import hashlib

    text = json.dumps({**body, "self_sha256": SELF_ZERO}, indent=1, sort_keys=True) + "\n"
    h = hashlib.sha256(text.encode()).hexdigest()
    return text.replace(f'"self_sha256": "{SELF_ZERO}"', f'"self_sha256": "{h}"', 1).encode()


def write_manifest(dest: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = file_entries(dest)
    body = {"format": BUNDLE_FORMAT, **meta, "files": files}
    (dest / MANIFEST_JSON).write_bytes(manifest_bytes(body))
    return body


# ----------------------------------------------------------------------------- what can ship

#: Sources whose runs k2repro's own trainer made (packed data, DCP checkpoints, batch hashes).
K2_SOURCES = ("train", "replay")


def foreign_sources(chain: list[dict[str, Any]]) -> list[str]:
    """The `source` of every launch k2repro did not train itself (audit API, the Transformers
    or Lightning callback, an importer): such a run has no k2repro packed data and no DCP
    checkpoints with a k2repro manifest, so neither can ship."""
    return sorted({str(r.get("source")) for r in chain if (r.get("source") or "train") not in K2_SOURCES})


def what_ships_line(chain: list[dict[str, Any]], sources: list[str], n_ckpts: int) -> str:
    """One line, said before any work: what a bundle of a run of that source holds and what it
    cannot (instead of failing on `--no-data`, then on `--checkpoints none`)."""
    head = chain[-1]["run_id"]
    return (f"run {head} (source {', '.join(sources)}) was not trained by k2repro: the bundle ships its tables, "
            f"config, environment, evals and model card, not its data (no k2repro packed data) nor its "
            f"{n_ckpts} recorded checkpoint(s) (not k2repro DCP checkpoints), so it documents the run but "
            f"cannot replay it")


def incomplete_run(root: Path, chain: list[dict[str, Any]], steps: pa.Table | None) -> list[str]:
    """Why the stored run is not whole: a folder (or anything but a file) where a segment
    belongs, which every query skips silently, and, for k2repro-trained runs (which log every
    step), steps missing between the first and the last."""
    from k2repro.tools.gc import run_folders

    problems: list[str] = []
    ids = {r["run_id"] for r in chain}
    for rid, dirs in sorted(run_folders(root).items()):
        if rid not in ids:
            continue
        for d in dirs:
            for table in S.TABLES:
                tdir = d / table
                if not tdir.is_dir():
                    continue
                for seg in sorted(tdir.glob("*.parquet")):
                    if not seg.is_file() or seg.is_symlink():
                        problems.append(f"{seg} is not a segment file (every query skips it)")
    if steps is not None and steps.num_rows and not foreign_sources(chain):
        have = set(steps.column("step").to_pylist())
        lo, hi = min(have), max(have)
        missing = sorted(set(range(lo, hi + 1)) - have)
        if missing:
            problems.append(f"{len(missing)} of steps {lo}..{hi} are missing (first: {missing[0]})")
    return problems


def _inside_store(out: Path, root: Path) -> bool:
    return _inside_dir(out.parent, root) or out.resolve() == root.resolve()


# ----------------------------------------------------------------------------- signature

#: The detached ed25519 signature of MANIFEST.json (not listed in it: it signs it).
SIGNATURE = "MANIFEST.sig"


def key_fingerprint(raw_public: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its sha256."""
    import hashlib

    return hashlib.sha256(raw_public).hexdigest()[:16]


def load_private_key(path: str | Path) -> Any:
    """An unencrypted ed25519 private key (PEM, PKCS#8 or OpenSSH: `openssl genpkey -algorithm
    ed25519`, `ssh-keygen -t ed25519 -N ''`); BadInputError naming the file otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"--sign {p}: cannot read the key ({exc.strerror})") from None
    key = None
    for loader in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            key = loader(raw, password=None)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"--sign {p}: not an unencrypted ed25519 private key (PEM or OpenSSH)")
    return key


def sign_bundle(dest: Path, key: Any) -> dict[str, str]:
    """Write MANIFEST.sig: the ed25519 signature of MANIFEST.json's bytes. MANIFEST.json holds
    the sha256 of every other file, so the signature covers the whole bundle."""
    from cryptography.hazmat.primitives import serialization

    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = key.sign((dest / MANIFEST_JSON).read_bytes())
    body = {"algorithm": "ed25519", "signed_file": MANIFEST_JSON, "public_key": pub.hex(),
            "fingerprint": key_fingerprint(pub), "signature": sig.hex()}
    (dest / SIGNATURE).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return body


# ----------------------------------------------------------------------------- the export

def export_run(store_root: str | Path | None, ref: str, out: str | Path, checkpoints: str = "last",
               with_samples: bool = False, data: bool = True, reports_dir: str | Path | None = "reports",
               progress: Progress | None = None, sign: str | Path | None = None,
               allow_incomplete: bool = False) -> dict[str, Any]:
    """Write the bundle of run `ref` (and its lineage chain) to `out`; returns bundle.json's
    content plus the bundle path and its size.

    `sign`: an ed25519 private key file; the bundle then carries MANIFEST.sig (origin, not just
    integrity: docs/release-bundle.md). An incomplete stored run (a segment that is a folder,
    steps missing) is refused unless `allow_incomplete`, which says so in the bundle. A run
    that k2repro did not train (audit API, callbacks) ships without data and checkpoints, said
    once, up front."""
    import yaml

    from k2repro import __version__
    from k2repro.audit.store import default_store, open_store

    say = progress or (lambda _m: None)
    kind, every = parse_selection(checkpoints)
    root = Path(store_root) if store_root is not None else default_store()
    if not root.is_dir():
        raise BadInputError(f"store {root} does not exist")
    out = Path(out)
    if out.exists():
        raise BadInputError(f"--out {out} already exists: the bundle goes to a new folder")
    if _inside_dir(out.parent, root):
        raise BadInputError(f"--out {out} is inside store {root}: the store would read the bundle's tables as "
                            f"more rows of the run (and gc would delete them); write it elsewhere")
    signing_key = load_private_key(sign) if sign is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.k2tmp-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        with open_store(root) as store:
            chain = logical_chain(store, ref)
            ids = [r["run_id"] for r in chain]
            say(f"logical run: {' -> '.join(ids)}")
            notes: list[str] = []
            what_ships: str | None = None
            foreign = foreign_sources(chain)
            if foreign:
                n_ck = store.execute("SELECT count(*) FROM checkpoints WHERE list_contains(?, run_id)",
                                     [ids]).fetchone()[0]
                what_ships = what_ships_line(chain, foreign, int(n_ck))
                say(what_ships)
                data, kind = False, "none"
            tables, counts = export_tables(store, chain, stage, with_samples)
            logical: dict[str, pa.Table] = {}
            for t in STEP_TABLES:
                if t in tables:
                    st = _stitch(tables[t], chain)
                    if st is not None:
                        logical[t] = st
                        _write_parquet(st, stage / "logical" / f"{t}.parquet")
            incomplete = incomplete_run(root, chain, logical.get("steps"))
            if incomplete and not allow_incomplete:
                raise BadInputError(f"run {ids[-1]} is incomplete in store {root}: {incomplete[0]}"
                                    + (f" (and {len(incomplete) - 1} more)" if len(incomplete) > 1 else "")
                                    + "; export refuses it (--allow-incomplete ships it, saying so in the bundle)")
            notes += [f"INCOMPLETE: {p}" for p in incomplete]
            data_info: dict[str, Any] = {"shipped": False}
            if data:
                data_info = ship_data(store, chain, stage)
                say(f"data shipped: {data_info['bytes'] / 1e6:.2f} MB")
            elif not foreign:
                notes.append("exported with --no-data: the bundle cannot replay without the packed data")
            sample_rows = None
            if not data_info.get("shipped"):
                sample_rows = {r["run_id"]: _arrow(store, "SELECT step, rank, sample_id FROM sample_stats "
                                                   "WHERE run_id = ?", [r["run_id"]]) for r in chain}
            order, order_info = data_order(store, chain, logical.get("steps"), data_info.get("n_samples"),
                                           sample_rows)
            if order is not None:
                _write_parquet(order, stage / "data" / "order.parquet")
            ckpts, ck_notes = export_checkpoints(store, chain, logical.get("checkpoints"), stage, kind, every, say)
            notes += ck_notes
            env = {rid: {} for rid in ids}
            for rid, rank, key, value in store.execute(
                    "SELECT run_id, rank, key, value FROM env WHERE list_contains(?, run_id) ORDER BY 1, 2, 3",
                    [ids]).fetchall():
                env[rid].setdefault(str(rank), {})[key] = value
        env = scrub_obj(env)  # credentials by value (audit/redact.py), also from older stores
        (stage / "env.json").write_text(json.dumps(env, indent=1, sort_keys=True) + "\n")
        configs = {r["run_id"]: scrub_obj(json.loads(r["config_json"])) for r in chain if r["config_json"]}
        if ids[0] in configs:
            (stage / "config.yaml").write_text(yaml.safe_dump(configs[ids[0]], sort_keys=True))
        if len(chain) > 1:
            for rid, cfg in configs.items():
                (stage / "configs").mkdir(exist_ok=True)
                (stage / "configs" / f"{rid}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
        forensics = []
        if reports_dir is not None:
            for rid in ids:
                src = Path(reports_dir) / rid
                for f in sorted(src.glob("forensics.*")) if src.is_dir() else []:
                    (stage / "forensics" / rid).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, stage / "forensics" / rid / f.name)
                    forensics.append(f"forensics/{rid}/{f.name}")
        have = {t: any((stage / "tables").glob(f"*/{t}/*.parquet")) for t in S.TABLES}
        write_bundle_duckdb(stage, have, sorted(logical))
        fig = loss_figure(logical.get("steps"), chain, ckpts, logical.get("evals"), stage / "figures" / "loss.png")
        st = logical.get("steps")
        info: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "bundle_version": BUNDLE_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(), "incomplete": incomplete,
            "what_ships": what_ships,
            "k2repro_version": __version__, "schema_version": S.SCHEMA_VERSION,
            "run": {"head": ids[-1], "root": ids[0], "name": chain[-1]["name"],
                    "chain": [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                               if k != "config_json"} for r in chain]},
            "steps": {"count": st.num_rows if st is not None else 0,
                      "first": int(st.column("step")[0].as_py()) if st is not None and st.num_rows else None,
                      "last": int(st.column("step")[-1].as_py()) if st is not None and st.num_rows else None,
                      "final_loss": st.column("loss")[-1].as_py() if st is not None and st.num_rows else None},
            "checkpoints": ckpts, "checkpoint_selection": checkpoints, "data": data_info,
            "data_order": {"file": "data/order.parquet" if order is not None else None, **order_info},
            "tables": counts, "with_samples": with_samples, "logical_tables": sorted(logical),
            "figures": ["figures/loss.png"] if fig else [], "forensics": forensics, "notes": notes,
        }
        (stage / BUNDLE_JSON).write_text(scrub_text(json.dumps(info, indent=1, sort_keys=True, default=str)) + "\n")
        (stage / "README.md").write_text(render_model_card(info, configs.get(ids[0], {}), env.get(ids[0], {}),
                                                           logical.get("evals")))
        write_manifest(stage, {"created_at": info["created_at"], "run": ids[-1], "runs": ids})
        if signing_key is not None:
            signed = sign_bundle(stage, signing_key)
            say(f"signed with ed25519 key {signed['fingerprint']}")
            info["signed_by"] = signed["fingerprint"]
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {**info, "bundle": str(out), "bytes": size}


# ----------------------------------------------------------------------------- model card

def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


MAX_CARD_KEYS = 40


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in sorted(cfg.items(), key=lambda kv: str(kv[0])):
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _short(v: Any, n: int = 80) -> str:
    text = str(v).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def render_model_card(info: dict[str, Any], cfg: dict[str, Any], env: dict[str, dict[str, str]],
                      evals: pa.Table | None) -> str:
    """README.md: what was trained, how, on what, with which results, and how to check it."""
    run, steps, data = info["run"], info["steps"], info["data"]
    chain = run["chain"]
    m, t, o = ((x if isinstance(x, dict) else {}) for x in (cfg.get("model"), cfg.get("train"), cfg.get("optim")))
    e0 = env.get("0", {})
    n_params = next((c["n_params"] for c in info["checkpoints"]), None)
    head = chain[-1]
    lines = [f"# {run['name'] or run['head']}: k2repro release bundle", "",
             f"Run `{run['head']}`"
             + (f", one logical run of {len(chain)} launches ({' -> '.join(r['run_id'] for r in chain)})"
                if len(chain) > 1 else "")
             + f". Exported {info['created_at'][:19]} UTC by k2repro {info['k2repro_version']} "
               f"(audit schema version {info['schema_version']}). Everything in this folder is listed with "
               f"its sha256 in `MANIFEST.json`; `bundle.json` is the machine-readable form of this page.",
             "", "## What", ""]
    foreign = [str(r.get("source")) for r in chain if (r.get("source") or "train") not in K2_SOURCES]
    dirty = str(e0.get("git.dirty", "")).strip().lower() in ("true", "1", "yes")
    if not foreign:
        tokens = (steps["count"] or 0) * int(t.get("global_batch_size") or 0) * int(t.get("seq_len") or 0)
        lines += [
            f"- Model: decoder-only transformer (RMSNorm, RoPE, SwiGLU), {m.get('n_layers')} layers, d_model "
            f"{m.get('d_model')}, {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads), FFN "
            f"{m.get('ffn_dim')}, vocab {m.get('vocab_size')}" + (f", {n_params:,} parameters" if n_params else "")
            + ".",
            f"- Trained {steps['count']} steps ({steps['first']}..{steps['last']}) of {t.get('global_batch_size')} "
            f"sequences x {t.get('seq_len')} tokens ({tokens:,} tokens) at world size {head.get('world_size')}, "
            f"precision {t.get('precision')}, deterministic={t.get('deterministic')}, seed {t.get('seed')}."]
    else:
        # Not k2repro's model: say only what the run recorded (its own config keys, verbatim).
        flat = _flat(cfg)
        shown = [(k, v) for k, v in flat.items() if v not in (None, "", [], {})][:MAX_CARD_KEYS]
        lines += [
            f"- Recorded through {', '.join(sorted(set(foreign)))} (k2repro logged the run; it did not train it, "
            f"so the model and optimizer are whatever that code built: see its config below and in `config.yaml`).",
            f"- {steps['count']} logged steps"
            + (f" ({steps['first']}..{steps['last']})" if steps["count"] else "")
            + f" at world size {head.get('world_size')}."]
        if shown:
            lines += ["", f"Recorded config ({len(shown)} of {len(flat)} keys; all in `config.yaml`):", "",
                      _md_table(["key", "value"], [[f"`{k}`", _short(v)] for k, v in shown]), ""]
    lines += [
        f"- Final training loss: {steps['final_loss']!r}." if steps["final_loss"] is not None else "- No steps.",
        f"- Config hash `{head.get('config_hash')}`; code `{e0.get('git.commit', 'unknown')}`"
        + (" (with uncommitted changes)" if dirty else "") + ".", ""]
    if info.get("incomplete"):
        lines += ["**Incomplete run** (exported with `--allow-incomplete`):", ""]
        lines += [f"- {p}" for p in info["incomplete"]] + [""]
    if evals is not None and evals.num_rows:
        d = evals.select(["step", "metric", "value"]).to_pylist()
        last = max(r["step"] for r in d)
        lines += [f"Evaluations of the checkpoint of step {last} (all steps: `logical/evals.parquet`):", "",
                  _md_table(["metric", "value"], [[r["metric"], f"{r['value']:.6g}"] for r in d
                                                  if r["step"] == last and r["value"] is not None]), ""]
    lines += ["## How", ""]
    if not foreign:
        lines += [f"- Optimizer: AdamW, lr {o.get('lr')} (warmup {o.get('warmup_steps')} steps, then cosine to "
                  f"{o.get('min_lr')}), weight decay {o.get('weight_decay')}, gradient clipping "
                  f"{o.get('clip_grad')}."]
    lines += ["- The resolved config is `config.yaml`" + (" (the first launch's; every launch's in `configs/`)"
                                                          if len(chain) > 1 else "") + ".",
              f"- Environment (rank 0): torch {e0.get('torch.version', '?')}, python {e0.get('python', '?')}, "
              f"CPU {e0.get('cpu.model', '?')}"
              + (f", {e0.get('gpu.count')} x {e0['gpu.name']} (driver {e0.get('gpu.driver')}, CUDA "
                 f"{e0.get('torch.cuda')})" if e0.get("gpu.name") not in (None, "", "absent") else ", no GPU")
              + "; every rank's facts in `env.json`.",
              ""]
    if data.get("shipped"):
        lines += [f"- Data: the packed training data ships in `data/packed/` ({data['n_samples']} samples, "
                  f"{data['bytes'] / 1e6:.2f} MB), checked against the sha256 the run recorded:", "",
                  _md_table(["artefact", "file", "sha256"],
                            [[a["artifact"], f"`{a['bundle_path']}`", f"`{a['sha256'][:16]}…`"]
                             for a in data["artifacts"]]), ""]
    else:
        lines += ["- Data: not shipped" + (" (k2repro did not pack it)" if foreign else " (exported with `--no-data`)")
                  + "; `tables/*/data_manifest` names what the run recorded.", ""]
    do = info["data_order"]
    if do.get("file"):
        lines += [f"- Data order: `{do['file']}` holds the sample ids of every step in batch order "
                  f"({do['source']}" + (f", checked against the recorded batch hash of {do['batch_hash_checked']} "
                                         f"steps" if do.get("batch_hash_checked") else "") + ").", ""]
    if info["figures"]:
        lines += ["## Figures", "", "![loss and gradient norm](figures/loss.png)", ""]
    lines += ["## Checkpoints", ""]
    if info["checkpoints"]:
        lines += [_md_table(["step", "run", "weights (safetensors)", "sha256", "replay state (DCP)"],
                            [[c["step"], f"`{c['run_id']}`", f"`{c['safetensors']}`",
                              f"`{c['safetensors_sha256'][:16]}…`", f"`{c['dcp']}`"] for c in info["checkpoints"]]),
                  ""]
    else:
        lines += ["None exported (`--checkpoints none`, or none left).", ""]
    if len(chain) > 1:
        lines += ["## Lineage", "", "A later launch's steps replace its parent's after the step it resumed from.", "",
                  _md_table(["run", "source", "parent", "resumed from step", "steps kept up to"],
                            [[f"`{r['run_id']}`", r.get("source"), r.get("parent_run_id"), r.get("resumed_from_step"),
                              r.get("cut") if r.get("cut") is not None else "end"] for r in chain]), ""]
    lines += ["## Files", "", _md_table(["path", "what"], [
        ["`README.md`", "this page"], ["`bundle.json`", "what this page says, as JSON"],
        ["`MANIFEST.json`", "sha256 and size of every file (and of itself)"],
        ["`config.yaml`", "the resolved config"], ["`env.json`", "hardware and software facts per run and rank"],
        ["`tables/<run_id>/<table>/*.parquet`", "the run's audit tables (a store: `k2repro sql --store tables`)"],
        ["`logical/<table>.parquet`", "steps, checkpoints, evals, ... stitched along the lineage"],
        ["`k2repro.duckdb`", "DuckDB views over the tables (open it from this folder)"],
        ["`data/packed/`, `data/order.parquet`", "the training data and the sample ids of every step"],
        ["`weights/step_*.safetensors`", "model weights of each exported checkpoint"],
        ["`dcp/<run_id>/step_*/`", "the same checkpoints with optimizer and RNG state, for replay"],
        ["`figures/`, `forensics/`", "the loss figure; the forensics report where one was made"]]), "",
        "## Check it, import it, replay it", "", "```",
        "k2repro verify-bundle .                      # every sha256; exit 1 names a changed file",
        "k2repro import bundle . --store runs         # verifies, then adds the run(s) to a store",
        f"k2repro replay {run['head']} --from-step A --to-step B --store runs   # bit-exact on the same "
        f"hardware and software", "```", "",
        "Replay re-runs steps from the shipped DCP checkpoints and data; bit-exactness needs the same world "
        "size, hardware, software and the deterministic flag (docs/reproducibility.md).", ""]
    notes = ([info["what_ships"]] if info.get("what_ships") else []) + info["notes"]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


__all__ = ["export_run", "render_model_card", "logical_chain", "parse_selection", "select_steps", "data_order", "to_safetensors",
           "manifest_bytes", "BUNDLE_FORMAT", "MANIFEST_JSON", "BUNDLE_JSON"]
