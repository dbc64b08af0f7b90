"""Where the paths a run recorded point once its bundle is imported: at the machine it trained
on, which the importing store is not. Every config value that names a path becomes the
imported copy (packed data, a resumed checkpoint), the store (`audit.store`) or empty, and so
do `data_manifest.path`, `checkpoints.path` and `runs.store_path`; each change is returned so
that the import records it (an `import` event, `_import.json`). Nothing outside the store stays
named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


def _replace_column(tbl: pa.Table, name: str, values: list) -> pa.Table:
    import pyarrow as pa

    i = tbl.schema.get_field_index(name)
    return tbl.set_column(i, tbl.schema.field(i), pa.array(values, type=tbl.schema.field(i).type))


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


def rewrite_table(table: str, tbl: pa.Table, ctx: dict[str, Any], ckpt_paths: dict[int, str],
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


__all__ = ["PATH_KEYS", "path_value", "rewrite_config", "rewrite_table"]
