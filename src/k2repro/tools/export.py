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
half bundle under the final name.
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
from k2repro.errors import BadInputError, CheckpointError, VerificationFailed
from k2repro.tools import lineage

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from k2repro.audit.store import Store

BUNDLE_FORMAT = "k2repro-bundle-v1"
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

    from k2repro.audit.writer import COMPRESSION

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, path, compression=COMPRESSION)


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


def ship_data(store: Store, chain: list[dict[str, Any]], dest: Path) -> dict[str, Any]:
    """Copy the packed training data (and artefacts beside it that it names, such as the
    tokenizer) to `data/`, and check every copied file against the run's recorded sha256."""
    from k2repro.data.packed import sha256_file

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
    artifacts = []
    for a in pman.get("artifacts", []):
        rel = a.get("path")
        if not rel or os.path.isabs(rel):
            continue
        target = (packed / rel).resolve()
        try:
            target.relative_to(data.resolve())
        except ValueError:
            continue  # outside the bundle's data folder: an earlier stage's artefact
        source = src / rel
        if not target.exists():
            if not source.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        sha = sha256_file(target)
        for want, where in ((a.get("sha256"), f"{src / 'manifest.json'}"),
                            (recorded.get(a["artifact"]), f"the data manifest of run {root['run_id']}")):
            if want and sha != want:
                shutil.rmtree(data, ignore_errors=True)
                raise BadInputError(f"data artefact {a['artifact']} ({source}) changed since the run: its "
                                    f"sha256 differs from {where}")
        artifacts.append({"artifact": a["artifact"], "bundle_path": target.relative_to(dest.resolve()).as_posix(),
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
            "bytes": total, "n_samples": n_samples}


def data_order(store: Store, chain: list[dict[str, Any]], steps: pa.Table | None,
               n_samples: int | None, samples: dict[str, pa.Table] | None) -> tuple[pa.Table | None, dict[str, Any]]:
    """Sample ids of every logical step, in batch order. Recomputed from (seed, samples,
    step, deferrals) (DESIGN.md section 6) and checked against the recorded `batch_hash` of
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
    from k2repro.data.packed import sha256_file
    from k2repro.train.manifest import verify_checkpoint

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
        name = lineage.step_dirname(step)
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
    from k2repro.data.packed import sha256_file

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


# ----------------------------------------------------------------------------- the export

def export_run(store_root: str | Path | None, ref: str, out: str | Path, checkpoints: str = "last",
               with_samples: bool = False, data: bool = True, reports_dir: str | Path | None = "reports",
               progress: Progress | None = None) -> dict[str, Any]:
    """Write the bundle of run `ref` (and its lineage chain) to `out`; returns bundle.json's
    content plus the bundle path and its size."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.k2tmp-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        with open_store(root) as store:
            chain = logical_chain(store, ref)
            ids = [r["run_id"] for r in chain]
            say(f"logical run: {' -> '.join(ids)}")
            tables, counts = export_tables(store, chain, stage, with_samples)
            logical: dict[str, pa.Table] = {}
            for t in STEP_TABLES:
                if t in tables:
                    st = _stitch(tables[t], chain)
                    if st is not None:
                        logical[t] = st
                        _write_parquet(st, stage / "logical" / f"{t}.parquet")
            notes: list[str] = []
            data_info: dict[str, Any] = {"shipped": False}
            if data:
                data_info = ship_data(store, chain, stage)
                say(f"data shipped: {data_info['bytes'] / 1e6:.2f} MB")
            else:
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
        (stage / "env.json").write_text(json.dumps(env, indent=1, sort_keys=True) + "\n")
        configs = {r["run_id"]: json.loads(r["config_json"]) for r in chain if r["config_json"]}
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
            "format": BUNDLE_FORMAT, "created_at": datetime.now(timezone.utc).isoformat(),
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
        (stage / BUNDLE_JSON).write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
        (stage / "README.md").write_text(render_model_card(info, configs.get(ids[0], {}), env.get(ids[0], {}),
                                                           logical.get("evals")))
        write_manifest(stage, {"created_at": info["created_at"], "run": ids[-1], "runs": ids})
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


def render_model_card(info: dict[str, Any], cfg: dict[str, Any], env: dict[str, dict[str, str]],
                      evals: pa.Table | None) -> str:
    """README.md: what was trained, how, on what, with which results, and how to check it."""
    run, steps, data = info["run"], info["steps"], info["data"]
    chain = run["chain"]
    m, t, o = cfg.get("model", {}), cfg.get("train", {}), cfg.get("optim", {})
    e0 = env.get("0", {})
    n_params = next((c["n_params"] for c in info["checkpoints"]), None)
    tokens = (steps["count"] or 0) * int(t.get("global_batch_size") or 0) * int(t.get("seq_len") or 0)
    head = chain[-1]
    lines = [f"# {run['name'] or run['head']}: k2repro release bundle", "",
             f"Run `{run['head']}`"
             + (f", one logical run of {len(chain)} launches ({' -> '.join(r['run_id'] for r in chain)})"
                if len(chain) > 1 else "")
             + f". Exported {info['created_at'][:19]} UTC by k2repro {info['k2repro_version']} "
               f"(audit schema version {info['schema_version']}). Everything in this folder is listed with "
               f"its sha256 in `MANIFEST.json`; `bundle.json` is the machine-readable form of this page.",
             "", "## What", ""]
    lines += [
        f"- Model: decoder-only transformer (RMSNorm, RoPE, SwiGLU), {m.get('n_layers')} layers, d_model "
        f"{m.get('d_model')}, {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads), FFN {m.get('ffn_dim')}, "
        f"vocab {m.get('vocab_size')}" + (f", {n_params:,} parameters" if n_params else "") + ".",
        f"- Trained {steps['count']} steps ({steps['first']}..{steps['last']}) of {t.get('global_batch_size')} "
        f"sequences x {t.get('seq_len')} tokens ({tokens:,} tokens) at world size {head.get('world_size')}, "
        f"precision {t.get('precision')}, deterministic={t.get('deterministic')}, seed {t.get('seed')}.",
        f"- Final training loss: {steps['final_loss']!r}." if steps["final_loss"] is not None else "- No steps.",
        f"- Config hash `{head.get('config_hash')}`; code `{e0.get('git.commit', 'unknown')}`"
        + (" (with uncommitted changes)" if e0.get("git.dirty") == "True" else "") + ".", ""]
    if evals is not None and evals.num_rows:
        d = evals.select(["step", "metric", "value"]).to_pylist()
        last = max(r["step"] for r in d)
        lines += [f"Evaluations of the checkpoint of step {last} (all steps: `logical/evals.parquet`):", "",
                  _md_table(["metric", "value"], [[r["metric"], f"{r['value']:.6g}"] for r in d
                                                  if r["step"] == last and r["value"] is not None]), ""]
    lines += ["## How", "",
              f"- Optimizer: AdamW, lr {o.get('lr')} (warmup {o.get('warmup_steps')} steps, then cosine to "
              f"{o.get('min_lr')}), weight decay {o.get('weight_decay')}, gradient clipping {o.get('clip_grad')}.",
              "- The resolved config is `config.yaml`" + (" (the first launch's; every launch's in `configs/`)"
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
        lines += ["- Data: not shipped (exported with `--no-data`); `tables/*/data_manifest` names it.", ""]
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
    if info["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in info["notes"]] + [""]
    return "\n".join(lines)


__all__ = ["export_run", "render_model_card", "logical_chain", "parse_selection", "select_steps", "data_order", "to_safetensors",
           "manifest_bytes", "BUNDLE_FORMAT", "MANIFEST_JSON", "BUNDLE_JSON"]
