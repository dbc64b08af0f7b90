"""Batch lookup: the samples one step trained on, from the store and recomputed.

The data order is a pure function of (seed, dataset, step, deferrals) (docs/architecture.md,
"Reproducibility rules"), so a step's sample ids can be recomputed without training; the
store logged them anyway (`sample_stats`, every rank). Agreement of the two is the check that
the data a run reports is the data it trained on. Each sample comes with its loss, its
documents and their text. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit.lineage import deferred_at
from k2repro.data.loader import batch_hash, data_position, global_batch_ids
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.store import Store


def logged_ids(store: Store, run_id: str, step: int) -> list[dict[str, Any]]:
    """The step's `sample_stats` rows in global batch order: by `batch_pos` where the writer
    recorded it, else by rank (each rank's share is contiguous) in the order it logged them."""
    cur = store.execute(
        "SELECT rank, sample_id, loss, n_tokens, batch_pos FROM sample_stats WHERE run_id = ? AND step = ?",
        [run_id, step])
    cols = [d[0] for d in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    if rows and all(r["batch_pos"] is not None for r in rows):
        return sorted(rows, key=lambda r: r["batch_pos"])
    return sorted(rows, key=lambda r: r["rank"])  # stable: keeps each rank's logged order


def _packed_dir(hp: dict[str, Any], override: str | Path | None) -> Path | None:
    d = override or hp.get("data.packed_dir")
    return Path(d) if d else None


def _injected(store: Store, run_id: str, step: int) -> set[int]:
    """Batch positions whose samples a bad-batch fault replaced at this step."""
    out: set[int] = set()
    for (detail,) in store.execute("SELECT detail FROM events WHERE run_id = ? AND step = ? AND "
                                   "kind = 'fault_injected'", [run_id, step]).fetchall():
        d = json.loads(detail or "{}")
        if d.get("kind") == "bad_batch":
            out.update(int(p) for p in d.get("positions", []))
    return out


def recompute_ids(hp: dict[str, Any], n_samples: int, step: int, deferred: list[int]) -> list[int]:
    """The step's global batch from seed, dataset size, step and deferrals alone."""
    pos = data_position(step, deferred, int(hp["train.max_steps"]))
    return [int(x) for x in global_batch_ids(int(hp["train.seed"]), n_samples, pos, int(hp["train.global_batch_size"]))]


def _data_state(store: Store, run_id: str, packed: Path | None) -> tuple[Any, bool | None, str | None]:
    """(dataset or None, does its manifest match the run's data_manifest?, why not)."""
    from k2repro.data.packed import PackedDataset

    if packed is None:
        return None, None, "the run recorded no data.packed_dir"
    try:
        ds = PackedDataset(packed, "train")
    except BadInputError as exc:
        return None, None, str(exc)
    recorded = dict(store.execute("SELECT artifact, sha256 FROM data_manifest WHERE run_id = ?", [run_id]).fetchall())
    now = {a["artifact"]: a["sha256"] for a in ds.artifacts()}
    keys = [k for k in recorded if k.startswith("packed/train")]
    if not keys:
        return ds, None, "the run recorded no packed training data in its data manifest"
    same = all(now.get(k) == recorded[k] for k in keys)
    return ds, same, None if same else f"the packed data in {packed} differs from what the run recorded"


def fsl_layout(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The run's fixed-length token files, from `data_manifest` rows whose detail says
    `"layout": "fsl"` (the OLMo-core callback writes them): sample i of file f is tokens
    [(i - first_sample) * L, (i - first_sample + 1) * L) of the raw array, L the sequence length."""
    out = []
    for path, sha, nbytes, detail in store.execute(
            "SELECT path, sha256, bytes, detail FROM data_manifest WHERE run_id = ?", [run_id]).fetchall():
        try:
            d = json.loads(detail or "{}")
        except ValueError:
            continue
        if d.get("layout") == "fsl" and d.get("sequence_length") and d.get("first_sample") is not None:
            out.append({"path": path, "sha256": sha, "bytes": nbytes, "dtype": d.get("dtype") or "uint16",
                        "seq": int(d["sequence_length"]), "first": int(d["first_sample"]),
                        "end": int(d["end_sample"])})
    return sorted(out, key=lambda f: f["first"])


def _fsl_state(files: list[dict[str, Any]]) -> tuple[bool | None, str | None]:
    """(are the token files the ones the run recorded?, why not): size always, sha256 where
    the run recorded one."""
    from k2repro.data.packed import sha256_file

    for f in files:
        p = Path(f["path"])
        if not p.is_file():
            return None, f"the run's token file {p} is not here: no token ids"
        if f["bytes"] is not None and p.stat().st_size != int(f["bytes"]):
            return False, f"the token file {p} differs from what the run recorded (size)"
        if f["sha256"]:
            if sha256_file(p) != f["sha256"]:
                return False, f"the token file {p} differs from what the run recorded (sha256)"
    return True, None


def fsl_tokens(files: list[dict[str, Any]], sample_id: int) -> list[int] | None:
    """The token ids of one sample of a fixed-length layout (None outside every file)."""
    import numpy as np

    for f in files:
        if f["first"] <= sample_id < f["end"]:
            dt = np.dtype(f["dtype"])
            arr = np.memmap(f["path"], dtype=dt, mode="r", offset=(sample_id - f["first"]) * f["seq"] * dt.itemsize,
                            shape=(f["seq"],))
            return [int(x) for x in arr]
    return None


def batch_lookup(store: Store, ref: str, step: int, packed_dir: str | Path | None = None,
                 text: bool = True) -> dict[str, Any]:
    """Everything about one step's batch (`k2repro batch --json`'s object)."""
    rid = store.resolve_run_id(ref)
    run = store.run(rid)
    hp = store.hparams(rid)
    srow = store.execute("SELECT batch_hash, loss FROM steps WHERE run_id = ? AND step = ? "
                         "ORDER BY time DESC NULLS LAST LIMIT 1", [rid, step]).fetchone()
    span = store.execute("SELECT min(step), max(step) FROM steps WHERE run_id = ?", [rid]).fetchone()
    if srow is None:
        have = f"steps {span[0]}..{span[1]}" if span and span[0] is not None else "no steps"
        raise BadInputError(f"run '{rid}' has no step {step} (it recorded {have})")
    logged = logged_ids(store, rid, step)
    notes: list[str] = []
    packed = _packed_dir(hp, packed_dir)
    fsl = fsl_layout(store, rid) if packed is None else []
    if fsl:  # another trainer's raw token files (OLMo-core): token ids, no documents
        ds, (data_same, why) = None, _fsl_state(fsl)
        if data_same is not True:
            fsl = []
    else:
        ds, data_same, why = _data_state(store, rid, packed)
    if why:
        notes.append(why)
    recomputed: list[int] | None = None
    deferred: list[int] = []
    if ds is not None and {"train.seed", "train.global_batch_size", "train.max_steps"} <= hp.keys():
        deferred = deferred_at(store, rid)
        recomputed = recompute_ids(hp, len(ds), step, deferred)
    elif ds is not None:
        notes.append("the run recorded no train.seed/global_batch_size/max_steps: ids cannot be recomputed")
    ids_logged = [int(r["sample_id"]) for r in logged]
    if not logged:
        notes.append("this store holds no logged sample ids or per-sample losses for this step "
                     "(audit.sample_stats off, an import from another tracker, or a bundle exported "
                     "without --with-samples)" + ("; the ids shown are recomputed from the run's seed, "
                                                 "data and step" if recomputed is not None else ""))
    agree = (ids_logged == recomputed) if (logged and recomputed is not None) else None
    hash_agrees = (batch_hash(recomputed) == srow[0]) if (recomputed is not None and srow[0]) else None
    order = recomputed if recomputed is not None else ids_logged
    by_id: dict[int, list[dict]] = {}
    for r in logged:
        by_id.setdefault(int(r["sample_id"]), []).append(r)
    injected = _injected(store, rid, step)
    ws = int(run.get("world_size") or 1)
    per = max(1, len(order) // ws)
    samples = []
    tok_note = None
    for pos, sid in enumerate(order):
        hit = by_id.get(sid, [])
        rec = hit.pop(0) if hit else None
        s: dict[str, Any] = {"batch_pos": pos, "rank": rec["rank"] if rec else min(pos // per, ws - 1),
                             "sample_id": sid, "loss": rec["loss"] if rec else None,
                             "n_tokens": rec["n_tokens"] if rec else None, "injected": pos in injected,
                             "docs": []}
        if fsl:
            s["tokens"] = fsl_tokens(fsl, sid)
        if ds is not None and 0 <= sid < len(ds):
            s["docs"] = [{"doc_id": d} for d in ds.docs_of(sid)]
            if text and tok_note is None:
                try:
                    from k2repro.data.pack import sample_text

                    s["docs"] = [{k: d[k] for k in ("doc_id", "domain", "snippet", "offset", "n_tokens")}
                                 for d in sample_text(packed, "train", sid)]
                except BadInputError as exc:
                    tok_note = f"no text: {exc}"
        samples.append(s)
    if tok_note:
        notes.append(tok_note)
    if injected:
        notes.append(f"a bad-batch fault replaced the samples at positions {sorted(injected)}: their text is "
                     f"not what trained")
    return {
        "run_id": rid, "step": step, "batch_hash": srow[0], "step_loss": srow[1],
        "logged_ids": ids_logged, "recomputed_ids": recomputed, "deferred": deferred,
        "agree": agree, "batch_hash_agrees": hash_agrees, "data_matches_run": data_same,
        "packed_dir": str(packed) if packed else None, "world_size": ws, "samples": samples, "notes": notes,
    }


def render_text(r: dict[str, Any]) -> str:
    def yn(v: bool | None) -> str:
        return "n/a" if v is None else ("yes" if v else "NO")

    out = [f"run {r['run_id']} step {r['step']}: {len(r['samples'])} samples, batch_hash {r['batch_hash']}, "
           f"loss {r['step_loss']!r}",
           f"  logged ids == recomputed from seed/manifest/step: {yn(r['agree'])}; "
           f"batch_hash of recomputed ids matches: {yn(r['batch_hash_agrees'])}; "
           f"data unchanged since the run: {yn(r['data_matches_run'])}"]
    if r["deferred"]:
        out.append(f"  deferred data positions in force: {r['deferred']}")
    for s in r["samples"]:
        loss = "n/a" if s["loss"] is None else f"{s['loss']:.4f}"
        flag = "  [fault-injected]" if s["injected"] else ""
        out.append(f"\n[{s['batch_pos']}] sample {s['sample_id']}  rank {s['rank']}  loss {loss}{flag}")
        if s.get("tokens") is not None:
            more = " ..." if len(s["tokens"]) > 16 else ""
            out.append(f"    tokens ({len(s['tokens'])}): {' '.join(map(str, s['tokens'][:16]))}{more}")
        for d in s["docs"]:
            snip = d.get("snippet")
            out.append(f"    {d['doc_id']}" + (f" ({d.get('domain')}): {snip[:160]!r}" if snip is not None else ""))
    for n in r["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out)
