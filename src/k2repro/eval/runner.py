"""`k2repro eval`: plan (in the launching process), evaluate (in every rank), write `evals` rows.

Planning reads the store and the disk and checks everything before any rank starts: the run and
its resolved config, the packed data (it must be the data the run trained on), and each selected
checkpoint's files against its manifest (and the manifest against the sha256 the run recorded).
A bad checkpoint therefore fails the whole command with exit 2 before anything is written.

Evaluation loads each checkpoint's model weights only (a subset of the DCP checkpoint: the
optimizer state is not read), sharded with FSDP at world size > 1, resharded from whatever world
size saved it. Rank 0 writes one segment per checkpoint,
`<out_store>/<run_id>/evals/step_<step>-<sha16>-<settings16>.parquet`: a deterministic name and deterministic
rows (no timestamps), so evaluating the same checkpoint again rewrites the same bytes. A
checkpoint whose manifest sha256 already has rows made with the same settings (in `--store` or
`--out-store`) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from k2repro.core.layout import inside_dir
from k2repro.errors import BadInputError, CheckpointError, K2ReproError

EVAL_FORMAT = "k2repro-eval-v1"
DEFAULT_K = 32
DEFAULT_MEM_SAMPLES = 128


@dataclass
class CheckpointRef:
    step: int
    path: str
    manifest_sha256: str


@dataclass
class EvalPlan:
    """Everything a rank needs, as plain data (it travels to torchrun workers as JSON)."""

    run_id: str
    config: dict
    data_dir: str
    out_store: str
    settings: dict
    settings_hash: str
    batch_size: int = 8
    todo: list[CheckpointRef] = field(default_factory=list)
    skipped: list[CheckpointRef] = field(default_factory=list)
    skipped_results: list[dict] = field(default_factory=list)  # their stored metrics
    missing: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalPlan:
        d = json.loads(text)
        for key in ("todo", "skipped"):
            d[key] = [CheckpointRef(**c) for c in d[key]]
        return cls(**d)


# ---------------------------------------------------------------------------------------- plan

def parse_steps(text: str | None) -> list[int] | None:
    """`--steps 100,200,300` (None or 'all': every checkpoint)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out = []
    for part in text.split(","):
        try:
            out.append(int(part.strip()))
        except ValueError:
            raise BadInputError(f"--steps: '{part.strip()}' is not a step number (e.g. --steps 100,200)") from None
    return sorted(set(out))


def _file_sha(path: Path) -> str:
    from k2repro.core.hashing import sha256_file

    return sha256_file(path)


def find_checkpoints(store_root: Path, run_id: str, cfg: Any, recorded: Sequence[dict]) -> tuple[dict[int, Path], list[int]]:
    """Complete checkpoint folders of the run on disk ({step: path}) and recorded steps that are
    not on disk (pruned by ckpt.keep_last, or moved). Looks under the store root, where the run
    recorded them, and under the run's checkpoint base (`ckpt.dir` or `audit.store`)."""
    from k2repro.core.ckpt_manifest import list_checkpoints

    # first under the store the user named (a copied or moved store wins over recorded paths)
    dirs: list[Path] = sorted(store_root.glob(f"**/{run_id}/checkpoints")) if store_root.is_dir() else []
    for r in recorded:
        if r.get("path"):
            dirs.append(Path(str(r["path"])).parent)
    dirs.append(Path(cfg.ckpt.dir or cfg.audit.store) / run_id / "checkpoints")
    found: dict[int, Path] = {}
    seen: set[Path] = set()
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key in seen:
            continue
        seen.add(key)
        for step, path in list_checkpoints(d):
            found.setdefault(step, path)
    missing = sorted({int(r["step"]) for r in recorded} - set(found))
    return found, missing


def _check_data(ds_train: Any, ds_val: Any, data_dir: Path, run_id: str, manifest_rows: list[dict],
                seq_len: int) -> None:
    recorded = {str(r["artifact"]): r.get("sha256") for r in manifest_rows}
    for a in ds_train.artifacts():
        if a["artifact"] == "packed/train.bin":
            want = recorded.get("packed/train.bin")
            if want and want != a["sha256"]:
                raise BadInputError(f"data: {data_dir / a['path']} is not the data run {run_id} trained on "
                                    "(sha256 differs from its data_manifest; pass --data-dir)")
    if ds_val.seq_len < seq_len:
        raise BadInputError(f"data: {data_dir} packs windows of {ds_val.seq_len} tokens, shorter than the "
                            f"run's train.seq_len={seq_len}")
    if len(ds_val) == 0:
        raise BadInputError(f"data: {data_dir} has no validation windows (split 'val' is empty)")


def _artifact_sha(ds: Any, name: str) -> str | None:
    return next((a["sha256"] for a in ds.artifacts() if a["artifact"] == name), None)


def known_keys(config: dict, node: Any = None, prefix: str = "") -> tuple[dict, list[str]]:
    """The run's resolved config without the keys that this k2repro's schema no longer has
    (a run trained by another version), and the dotted names of those dropped. Evaluation
    needs the model, data and train keys; a removed key cannot change them."""
    import dataclasses

    from k2repro.config.schema import RunConfig

    node = RunConfig() if node is None else node
    kept: dict = {}
    dropped: list[str] = []
    for key, value in config.items():
        if not hasattr(node, key):
            dropped.append(prefix + key)
            continue
        child = getattr(node, key)
        if dataclasses.is_dataclass(child) and isinstance(value, dict):
            kept[key], sub = known_keys(value, child, f"{prefix}{key}.")
            dropped += sub
        else:
            kept[key] = value
    return kept, dropped


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


EVAL_ROWS_SQL = ("SELECT step, metric, value, n_tokens, manifest_sha256, detail FROM evals "
                 "WHERE run_id = ? AND manifest_sha256 IS NOT NULL ORDER BY step, metric")


def _existing(rows: Sequence[tuple]) -> dict[tuple[str, str], dict]:
    """Stored results keyed by (manifest_sha256, settings_hash), from `evals` rows."""
    out: dict[tuple[str, str], dict] = {}
    for step, metric, value, n_tok, sha, detail in rows:
        try:
            d = json.loads(detail or "{}")
        except json.JSONDecodeError:
            continue
        obj = out.setdefault((sha, str(d.get("settings_hash", ""))), {
            "step": int(step), "tokens": d.get("tokens"), "manifest_sha256": sha, "status": "skipped",
            "metrics": {}, "n_tokens": {}})
        obj["metrics"][metric] = value
        obj["n_tokens"][metric] = n_tok
    return out


def plan_eval(store: str | os.PathLike, run_ref: str, *, out_store: str | os.PathLike | None = None,
              steps: Sequence[int] | None = None, data_dir: str | os.PathLike | None = None,
              k: int = DEFAULT_K, mem_samples: int = DEFAULT_MEM_SAMPLES, val_windows: int = 0,
              batch_size: int = 8, force: bool = False) -> EvalPlan:
    """Resolve the run, its data and checkpoints, verify what will be evaluated; raise
    BadInputError / CheckpointError (exit 2) naming the culprit. Writes nothing."""
    from k2repro.data.packed import PackedDataset

    if k < 1 or mem_samples < 0 or val_windows < 0 or batch_size < 1:
        raise BadInputError("--k and --batch-size must be >= 1, --mem-samples and --val-windows >= 0")
    root = Path(store)
    if not root.is_dir():
        raise BadInputError(f"no store at {root} (pass --store or set K2REPRO_STORE)")
    run_id, row, recorded, manifest_rows, eval_rows = _run_rows(root, run_ref)
    from k2repro.audit.capability import capability_line

    refuse = capability_line("eval", run_id, row.get("source"), len(recorded))
    if refuse:  # before its config is read: an API run's config is not k2repro's
        raise BadInputError(refuse)
    out_root = Path(out_store or root)
    if out_root.is_dir() and not inside_dir(out_root, root):  # the query layer sees nested roots already
        eval_rows += _stored_evals(out_root, run_id)
    config, cfg = _run_config(root, run_id, row)
    ddir = Path(data_dir or cfg.data.packed_dir)
    ds_train, ds_val = PackedDataset(ddir, "train"), PackedDataset(ddir, "val")
    _check_data(ds_train, ds_val, ddir, run_id, manifest_rows, cfg.train.seq_len)
    settings = _settings(cfg, ds_train, ds_val, k, mem_samples, val_windows)
    plan = EvalPlan(run_id=run_id, config=config, data_dir=str(ddir), out_store=str(out_root),
                    settings=settings, settings_hash=settings_hash(settings), batch_size=batch_size)
    selected = _select_checkpoints(plan, root, cfg, recorded, steps)
    _todo_or_done(plan, selected, recorded, {} if force else _existing(eval_rows))
    return plan


def _run_rows(root: Path, run_ref: str) -> tuple[str, dict, list[dict], list[dict], list]:
    """(run id, runs row, recorded checkpoints, data manifest rows, stored eval rows) of the
    run in the store at `root`."""
    from k2repro.audit.store import open_store

    with open_store(root) as st:
        run_id = st.resolve_run_id(run_ref)
        row = st.run(run_id)
        recorded = st.checkpoints(run_id)[["step", "path", "manifest_sha256"]].to_dict("records")
        manifest_rows = st.sql("SELECT artifact, sha256 FROM data_manifest WHERE run_id = ?",
                               [run_id]).to_dict("records")
        eval_rows = st.execute(EVAL_ROWS_SQL, [run_id]).fetchall()
    return run_id, row, recorded, manifest_rows, eval_rows


def _stored_evals(root: Path, run_id: str) -> list:
    """Eval rows of the run in another store (`--out-store`): results stored there count too."""
    from k2repro.audit.store import open_store

    with open_store(root) as st:
        return st.execute(EVAL_ROWS_SQL, [run_id]).fetchall()


def _run_config(root: Path, run_id: str, row: dict) -> tuple[dict, Any]:
    """(the run's config as this k2repro knows it, typed); keys this version no longer has are
    dropped with a warning line."""
    from k2repro.config.load import from_dict

    if not row.get("config_json"):
        raise BadInputError(f"run {run_id} has no resolved config in {root} (imported runs cannot be evaluated)")
    config, dropped = known_keys(json.loads(row["config_json"]))
    if dropped:
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        _eprint(f"eval {run_id}: {len(dropped)} config key(s) unknown to this k2repro ignored: "
                f"{', '.join(dropped[:5])}{more}")
    return config, from_dict(config)


def _settings(cfg: Any, ds_train: Any, ds_val: Any, k: int, mem_samples: int, val_windows: int) -> dict:
    """What an evaluation's numbers depend on (hashed: a stored result with the same hash and
    checkpoint is reused)."""
    from k2repro.eval.memorization import effective_k

    return {
        "format": EVAL_FORMAT, "k": effective_k(k, cfg.train.seq_len, cfg.model.max_seq_len),
        "k_requested": k, "mem_samples": mem_samples,
        "val_windows": val_windows, "seq_len": cfg.train.seq_len, "mem_seed": cfg.train.seed,
        "val_sha256": _artifact_sha(ds_val, "packed/val.bin"),
        "val_docs_sha256": _artifact_sha(ds_val, "packed/val.docs"),
        "train_sha256": _artifact_sha(ds_train, "packed/train.bin"),
    }


def _select_checkpoints(plan: EvalPlan, root: Path, cfg: Any, recorded: list[dict],
                        steps: Sequence[int] | None) -> dict[int, Path]:
    """The checkpoints on disk to evaluate: those of `steps` (each must be there), else all
    (recorded ones not on disk go to `plan.missing`)."""
    run_id = plan.run_id
    found, missing = find_checkpoints(root, run_id, cfg, recorded)
    if steps is not None:
        absent = [s for s in steps if s not in found]
        if absent:
            have = ", ".join(str(s) for s in sorted(found)) or "none"
            raise BadInputError(f"--steps: run {run_id} has no checkpoint on disk for step(s) "
                                f"{', '.join(map(str, absent))} (on disk: {have})")
        selected = {s: found[s] for s in steps}
    else:
        selected = found
        plan.missing = missing
    if not selected:
        raise BadInputError(f"run {run_id} has no checkpoint on disk (ckpt.interval=0, or pruned)")
    return selected


def _todo_or_done(plan: EvalPlan, selected: dict[int, Path], recorded: list[dict],
                  done: dict[tuple[str, str], dict]) -> None:
    """Each selected checkpoint's manifest must be the one the run recorded; one evaluated
    before with the same settings is skipped (its stored results reused), the others are
    verified file by file and queued."""
    from k2repro.core.ckpt_manifest import MANIFEST, verify_checkpoint

    by_step = {int(r["step"]): r.get("manifest_sha256") for r in recorded}
    for step, path in sorted(selected.items()):
        mpath = path / MANIFEST
        sha = _file_sha(mpath)
        want = by_step.get(step)
        if want and want != sha:
            raise CheckpointError(f"checkpoint manifest {mpath} is not the one run {plan.run_id} recorded "
                                  f"(sha256 {sha[:16]}..., recorded {str(want)[:16]}...)")
        ref = CheckpointRef(step=step, path=str(path), manifest_sha256=sha)
        if (sha, plan.settings_hash) in done:
            plan.skipped.append(ref)
            plan.skipped_results.append({**done[(sha, plan.settings_hash)], "path": str(path)})
        else:
            verify_checkpoint(path)  # every file against the manifest: CheckpointError names it
            plan.todo.append(ref)


# ------------------------------------------------------------------------------------ evaluate

def load_model_weights(model: Any, path: str | os.PathLike) -> None:
    """Load only the model's entries of a DCP checkpoint (model + optimizer inside), resharding
    to this model's sharding. The caller verified the files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"model": sd}, checkpoint_id=str(path))
    set_model_state_dict(model, sd)


def _deferred(path: Path) -> list[int]:
    """The data positions the guard had deferred when this checkpoint was saved."""
    import torch

    state = torch.load(path / "rank0.pt", weights_only=False, map_location="cpu")
    return [int(d) for d in state.get("sampler", {}).get("deferred", [])]


def write_eval_rows(out_store: str | os.PathLike, run_id: str, ck: CheckpointRef,
                    rows: Sequence[tuple[str, float, int]], detail: dict) -> Path:
    """One deterministic segment per (checkpoint, manifest, settings): `--force` rewrites it in
    place; other settings add their own segment beside it."""
    from k2repro.audit.storemeta import ensure_store
    from k2repro.audit.writer import to_arrow, write_segment

    root = Path(out_store)
    ensure_store(root)
    n = len(rows)
    text = json.dumps(detail, sort_keys=True)
    tbl = to_arrow("evals", {
        "step": [ck.step] * n, "metric": [r[0] for r in rows], "value": [float(r[1]) for r in rows],
        "n_tokens": [int(r[2]) for r in rows], "manifest_sha256": [ck.manifest_sha256] * n,
        "detail": [text] * n,
    }, run_id)
    name = f"step_{ck.step:08d}-{ck.manifest_sha256[:16]}-{str(detail.get('settings_hash', ''))[:16]}.parquet"
    return write_segment(root / run_id / "evals", name, tbl)


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(plan: EvalPlan, info: Any, progress: Callable[[str], None] | None = _eprint) -> list[dict]:
    """Evaluate `plan.todo` in this rank (collective at world size > 1); rank 0 writes rows.
    Returns one result object per checkpoint (the same on every rank)."""
    import torch

    from k2repro.config.load import from_dict
    from k2repro.data.packed import PackedDataset
    from k2repro.distributed.determinism import set_determinism
    from k2repro.distributed.fsdp import apply_fsdp
    from k2repro.eval.memorization import (
        greedy_match,
        memorization_metrics,
        memorization_sample,
        seen_sample_ids,
    )
    from k2repro.eval.perplexity import held_out_loss, load_val, perplexity_metrics
    from k2repro.model.build import build_model

    cfg = from_dict(plan.config)
    s = plan.settings
    set_determinism(cfg.train.deterministic)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    seq_len, k = int(s["seq_len"]), int(s["k"])
    say = progress if (progress and info.is_main) else (lambda _m: None)
    say(f"eval {plan.run_id}: loading data and building the model")
    val = load_val(PackedDataset(plan.data_dir, "val"), seq_len, int(s["val_windows"]))
    train = PackedDataset(plan.data_dir, "train")
    model = build_model(cfg.model, cfg.train.seed, info.device)
    if info.distributed:
        apply_fsdp(model, "fp32")  # evaluation in fp32 at every world size, so results agree
    results = []
    total = len(plan.todo)
    if hasattr(progress, "total") and info.is_main:
        progress.total(total)  # type: ignore[union-attr]
    for i, ck in enumerate(plan.todo, 1):
        t0 = time.perf_counter()
        path = Path(ck.path)
        say(f"eval {plan.run_id} step {ck.step} ({i}/{total}): loading weights")
        load_model_weights(model, path)
        seen = seen_sample_ids(cfg.train.seed, len(train), cfg.train.global_batch_size, cfg.train.max_steps,
                               ck.step, _deferred(path))
        ids = memorization_sample(int(s["mem_seed"]), len(train), seen, int(s["mem_samples"]))
        windows = train.get(ids, seq_len)
        say(f"eval {plan.run_id} step {ck.step} ({i}/{total}): perplexity over {len(val.tokens)} validation windows")
        ppl = held_out_loss(model, val, info.device, plan.batch_size, info.rank, info.world_size)
        say(f"eval {plan.run_id} step {ck.step} ({i}/{total}): memorization over {len(ids)} training sequences")
        matched = greedy_match(model, windows, k, info.device, plan.batch_size, info.rank, info.world_size)
        rows = perplexity_metrics(ppl) + memorization_metrics(matched, k)
        tokens = ck.step * cfg.train.global_batch_size * seq_len
        detail = {**s, "settings_hash": plan.settings_hash, "tokens": tokens, "world_size": info.world_size,
                  "mem_sample_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()[:16]}
        segment = write_eval_rows(plan.out_store, plan.run_id, ck, rows, detail) if info.is_main else None
        dt = time.perf_counter() - t0
        res = {"step": ck.step, "tokens": tokens, "manifest_sha256": ck.manifest_sha256, "path": ck.path,
               "status": "evaluated", "metrics": {m: v for m, v, _ in rows},
               "n_tokens": {m: n for m, _, n in rows},
               "memorization": {"k": k, "sample_ids": ids.tolist(), "matched": matched.tolist()},
               "seconds": round(dt, 3), "segment": str(segment) if segment else None}
        results.append(res)
        if progress and info.is_main:
            m = res["metrics"]
            mem = "".join(f" {k} {m[k]:.3f}" for k in ("mem/exact_match", "mem/matched_prefix") if k in m)
            line = (f"eval {plan.run_id} step {ck.step} ({i}/{total}): val/loss {m['val/loss']:.4f} "
                    f"val/ppl {m['val/ppl']:.3f}{mem} [{dt:.1f}s]")
            getattr(progress, "note", progress)(line)
            if hasattr(progress, "advance"):
                progress.advance()  # type: ignore[union-attr]
    return results


# ------------------------------------------------------------------------------------ workers

def worker_main(argv: Sequence[str] | None = None) -> int:
    """`python -m k2repro.eval PLAN.json RESULTS.json` (what `torchrun` launches): evaluate as
    one rank; rank 0 writes the results (or the error) as JSON."""
    from k2repro.distributed.init import init_distributed, teardown

    argv = list(sys.argv[1:] if argv is None else argv)
    plan = EvalPlan.from_json(Path(argv[0]).read_text())
    out = Path(argv[1])
    info = init_distributed("auto")
    code = 0
    try:
        payload: dict = {"results": evaluate(plan, info)}
    except K2ReproError as exc:
        code = exc.exit_code
        payload = {"error": str(exc), "exit_code": code}
        if info.is_main:
            _eprint(f"k2repro eval: error: {exc}")
    finally:
        teardown()
    if info.is_main:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(payload, allow_nan=True))
        os.replace(tmp, out)
    return code


def summary_rows(results: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    """A text table of results: step, tokens, status, then every metric."""
    metrics: list[str] = []
    for r in results:
        for m in r.get("metrics", {}):
            if m not in metrics:
                metrics.append(m)
    order = ["val/loss", "val/ppl"] + sorted(m for m in metrics if m.startswith("val/ppl/")) + \
        ["mem/exact_match", "mem/matched_prefix"]
    order = [m for m in order if m in metrics] + [m for m in metrics if m not in order]
    cols = ["step", "tokens", "status", *order]
    rows = [[r["step"], r.get("tokens"), r["status"], *(_round(r.get("metrics", {}).get(m)) for m in order)]
            for r in results]
    return cols, rows


def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    return v


__all__ = ["CheckpointRef", "EvalPlan", "plan_eval", "evaluate", "write_eval_rows", "load_model_weights",
           "find_checkpoints", "parse_steps", "worker_main", "CheckpointError"]
