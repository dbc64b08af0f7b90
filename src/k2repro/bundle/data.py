"""The data a bundle ships and the order it was read in.

`ship_data` copies the packed training data and the tokenizer it was made with to `data/`
and checks every copied file against the packed manifest and the sha256 the run recorded:
what `batch`, `eval` and `replay` need must ship, or the export fails naming it (exit 2),
instead of leaving a bundle that fails later. `data_order` writes the sample ids of every
logical step in batch order, recomputed from (seed, samples, step, deferrals) and checked
against each step's recorded `batch_hash`, or taken from `sample_stats` when the data is not
at hand."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import lineage
from k2repro.core.layout import inside_dir
from k2repro.errors import BadInputError, VerificationFailed

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from k2repro.audit.store import Store


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


def _wanted(pman: dict[str, Any], src: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(bundle-relative path under data/ -> artefact row with its `_source`, the artefacts of
    earlier stages that are named but not shipped)."""
    tok_rel = pman.get("tokenizer")
    wanted: dict[str, dict[str, Any]] = {}
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
        wanted[tok_rel] = {"artifact": "tokenizer/tokenizer.json", "path": tok_rel,
                           "sha256": pman.get("tokenizer_sha256"), "_source": src.parent / tok_rel}
    return wanted, not_shipped


def _ship_one(rel: str, a: dict[str, Any], dest: Path, src: Path, pman: dict[str, Any],
              recorded: dict[str, str], root_id: str) -> dict[str, Any]:
    """Copy one artefact to `dest/data/rel` (unless the packed copy brought it) and check its
    sha256 against the packed manifest, the run's data manifest and, for the tokenizer, the
    packed manifest's `tokenizer_sha256`. Any failure removes `data/` and names the file."""
    from k2repro.core.hashing import sha256_file

    data = dest / "data"
    man = src / "manifest.json"
    target, source = data / rel, Path(a["_source"])

    def fail(msg: str) -> BadInputError:
        shutil.rmtree(data, ignore_errors=True)
        return BadInputError(msg)

    if os.path.isabs(rel) or not inside_dir(target, data):
        raise fail(f"{man}: artefact {a['artifact']} lies at {rel!r}, outside the folder beside the packed "
                   f"data: the bundle cannot ship it (move the tokenizer next to the packed folder and "
                   f"re-pack, or pass --no-data)")
    if not target.is_file():
        if not source.is_file():
            raise fail(f"{man} names {a['artifact']} at {source}, which is not here: the bundle cannot ship it "
                       f"(batch, eval and replay need it); restore it, or pass --no-data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    sha = sha256_file(target)
    checks = [(a.get("sha256"), f"{man}"), (recorded.get(a["artifact"]), f"the data manifest of run {root_id}")]
    if rel == pman.get("tokenizer"):
        checks.append((pman.get("tokenizer_sha256"), f"the tokenizer_sha256 of {man}"))
    for want, where in checks:
        if want and sha != want:
            raise fail(f"data artefact {a['artifact']} ({source}) changed since the run: its sha256 differs "
                       f"from {where}")
    return {"artifact": a["artifact"], "bundle_path": target.relative_to(dest).as_posix(),
            "sha256": sha, "bytes": target.stat().st_size}


def ship_data(store: Store, chain: list[dict[str, Any]], dest: Path) -> dict[str, Any]:
    """Copy the packed training data and the tokenizer it was made with to `data/` (the same
    layout as the run's: `data/packed/`, `data/<tokenizer path>`), and check every copied file
    against the packed manifest and the run's recorded sha256. What `batch`, `eval` and
    `replay` need must ship: a tokenizer the manifest names but that is not here, or that
    changed, stops the export (exit 2) instead of leaving a bundle that fails later. Artefacts
    of earlier stages (corpus, dedup output) are named, not shipped."""
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
    shutil.copytree(src, data / "packed", ignore=shutil.ignore_patterns(".*"))
    pman = json.loads((data / "packed" / "manifest.json").read_text())
    recorded = {a: s for a, _, s in rows}
    wanted, not_shipped = _wanted(pman, src)
    artifacts = [_ship_one(rel, a, dest, src, pman, recorded, root["run_id"]) for rel, a in sorted(wanted.items())]
    for r in chain[1:]:  # every launch of the chain trained on the same data
        for artifact, _, sha in store.execute(
                "SELECT artifact, path, sha256 FROM data_manifest WHERE run_id = ?", [r["run_id"]]).fetchall():
            mine = next((x for x in artifacts if x["artifact"] == artifact), None)
            if mine is not None and sha and sha != mine["sha256"]:
                raise BadInputError(f"run {r['run_id']} of the chain trained on other data ({artifact} differs)")
    tok_rel = pman.get("tokenizer")
    total = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    return {"shipped": True, "source": str(src), "packed_dir": "data/packed", "artifacts": artifacts,
            "tokenizer": f"data/{tok_rel}" if tok_rel else None, "not_shipped": sorted(not_shipped),
            "bytes": total, "n_samples": int(pman["splits"]["train"]["n_samples"])}


# ----------------------------------------------------------------------------- the data order

_ORDER_COLS = ("step", "run_id", "data_position", "batch_pos", "sample_id")


def _recomputed(store: Store, chain: list[dict[str, Any]], owner: dict[int, str], hashes: dict[int, Any],
                n_samples: int, cfgs: dict[str, dict[str, Any]]) -> tuple[dict[str, list], dict[str, Any]]:
    """The order from the sampler (seed, samples, step, the lineage's deferrals), each step
    checked against its recorded batch hash (VerificationFailed naming the step otherwise)."""
    from k2repro.data.loader import StepSampler, batch_hash, data_position

    cols: dict[str, list] = {c: [] for c in _ORDER_COLS}
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
    return cols, {"source": "recomputed", "steps": len(owner), "batch_hash_checked": checked}


def _from_samples(chain: list[dict[str, Any]], owner: dict[int, str], samples: dict[str, pa.Table]
                  ) -> dict[str, list]:
    """The order as logged in `sample_stats`: within a step by rank, then as logged; each step
    from the launch the logical run keeps it from."""
    import numpy as np

    cols: dict[str, list] = {c: [] for c in _ORDER_COLS}
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
    return cols


def data_order(store: Store, chain: list[dict[str, Any]], steps: pa.Table | None,
               n_samples: int | None, samples: dict[str, pa.Table] | None) -> tuple[pa.Table | None, dict[str, Any]]:
    """Sample ids of every logical step, in batch order. Recomputed from (seed, samples,
    step, deferrals) (docs/architecture.md, "Reproducibility rules") and checked against the recorded `batch_hash` of
    every step; from `sample_stats` (ordered by rank) when the data is not at hand."""
    import pyarrow as pa

    if steps is None or steps.num_rows == 0:
        return None, {"source": None, "steps": 0}
    st = steps.to_pydict()
    owner = dict(zip(st["step"], st["run_id"]))
    need = ("seed", "global_batch_size", "max_steps")
    cfgs = {r["run_id"]: json.loads(r["config_json"] or "{}").get("train") or {} for r in chain}
    if n_samples and all(all(k in c for k in need) for c in cfgs.values()):
        cols, info = _recomputed(store, chain, owner, dict(zip(st["step"], st["batch_hash"])), n_samples, cfgs)
    elif samples:
        cols = _from_samples(chain, owner, samples)
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


__all__ = ["ship_data", "data_order", "inside_dir"]
