"""Checkpoints in a bundle, twice: the DCP folder as the run wrote it (`dcp/<run_id>/step_*/`:
optimizer, RNG and sampler state, what replay needs) and the model weights alone as one
safetensors file (`weights/step_*.safetensors`: what a user loads). Every copied checkpoint is
checked against its own manifest and the manifest sha256 the run recorded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import lineage
from k2repro.core.layout import step_dirname
from k2repro.errors import BadInputError, CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from k2repro.audit.store import Store

Progress = Callable[[str], None]


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
    """The steps of `steps` a selection (parse_selection) keeps, ascending."""
    if kind == "none" or not steps:
        return []
    if kind == "last":
        return [max(steps)]
    if kind == "every":
        return [s for s in steps if s % n == 0]
    return sorted(steps)


def model_state(dcp_dir: Path) -> dict[str, Any]:
    """The `model` entries of a DCP checkpoint, whole, read in this one process (no process
    group): the tensors are allocated from the checkpoint's own metadata (names, shapes,
    dtypes) and filled by `torch.distributed.checkpoint.load`, through public API only."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    prefix = "model."
    model = {key[len(prefix):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for key, md in meta.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(md, dcp.TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.simplefilter("ignore")
        dcp.load({"model": model}, checkpoint_id=str(dcp_dir), no_dist=True)
    return model


def to_safetensors(dcp_dir: Path, out: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The model weights of a DCP checkpoint (no optimizer state) as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in sorted(model_state(dcp_dir).items())}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return {"n_params": int(sum(t.numel() for t in tensors.values())), "n_tensors": len(tensors),
            "dtype": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})}


def _locate(store: Store, chain: list[dict[str, Any]], rows: list[dict[str, Any]]
            ) -> tuple[list[tuple[int, str, Path, str | None]], list[str]]:
    """(step, run id, folder, recorded manifest sha256) of every checkpoint still on disk, and
    a note for each one that is gone."""
    notes: list[str] = []
    located = []
    for r in rows:
        cfg = json.loads(next(c["config_json"] for c in chain if c["run_id"] == r["run_id"]) or "{}")
        base = (cfg.get("ckpt") or {}).get("dir") or None
        where = lineage.checkpoint_dir(store, r["run_id"], int(r["step"]), r["path"], base)
        if where is None:
            notes.append(f"checkpoint of step {r['step']} (run {r['run_id']}) is gone (pruned?): not exported")
            continue
        located.append((int(r["step"]), r["run_id"], where, r["manifest_sha256"]))
    return located, notes


def _export_one(step: int, rid: str, where: Path, msha: str | None, dest: Path, say: Progress) -> dict[str, Any]:
    """Check one checkpoint, copy its DCP folder, convert its weights; bundle.json's entry."""
    from k2repro.core.ckpt_manifest import verify_checkpoint
    from k2repro.core.hashing import sha256_file

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
    return {"step": step, "run_id": rid, "dcp": dcp.relative_to(dest).as_posix(),
            "dcp_manifest_sha256": sha256_file(dcp / "manifest.json"),
            "safetensors": st.relative_to(dest).as_posix(), "safetensors_sha256": sha256_file(st),
            "safetensors_bytes": st.stat().st_size, "world_size": manifest.get("world_size"), **info}


def export_checkpoints(store: Store, chain: list[dict[str, Any]], logical_ckpts: pa.Table | None,
                       dest: Path, kind: str, n: int, say: Progress) -> tuple[list[dict[str, Any]], list[str]]:
    """The selected checkpoints of the logical run into `dest`; (bundle.json entries, notes on
    the ones that are gone)."""
    if logical_ckpts is None or kind == "none":
        return [], []
    rows = logical_ckpts.select(["step", "run_id", "path", "manifest_sha256"]).to_pylist()
    located, notes = _locate(store, chain, rows)
    chosen = set(select_steps([s for s, *_ in located], kind, n))
    out = [_export_one(step, rid, where, msha, dest, say) for step, rid, where, msha in located if step in chosen]
    return out, notes


__all__ = ["parse_selection", "select_steps", "model_state", "to_safetensors", "export_checkpoints"]
