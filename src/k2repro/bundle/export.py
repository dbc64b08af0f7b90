"""`k2repro export`: publish a run the way LLM360 publishes K2, as one self-describing folder.

A bundle holds the resolved config, the environment facts, the data manifest, the data order
(sample ids of every step), the run's tables (Parquet, laid out as a small store, plus a DuckDB
file of views), the selected checkpoints as safetensors weights *and* as the DCP folders that
replay needs (optimizer state, RNG, sampler), the packed training data, evals, the forensics
report and a generated README (model card with a loss figure). `MANIFEST.json` holds the
sha256 of every file; docs/release-bundle.md describes the layout and what it guarantees.
This module runs the export in order; each piece is built by its own module of the package.

A lineage chain (resumes, guard rollbacks) is exported as one logical run
(`audit.lineage.logical_chain`): every launch's own rows are kept (so the bundle imports as
the same runs), and `logical/*.parquet` stitch them.

The bundle is built in a dot folder beside `--out` and renamed into place: a crash leaves no
half bundle under the final name. `--out` inside the store is refused (the store's globs
would read the bundle's tables as rows of the run). What replay, batch and eval need ships
(the packed data and its tokenizer) or the export fails naming it; an incomplete stored run
is refused unless `--allow-incomplete` says so in the bundle; a run k2repro did not train
ships without data and checkpoints, said once up front. `--sign KEY` adds MANIFEST.sig, an
ed25519 signature of MANIFEST.json: checksums prove integrity, only a signature proves origin.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.audit.lineage import logical_chain
from k2repro.audit.redact import scrub_obj, scrub_text
from k2repro.bundle.card import foreign_sources, loss_figure, render_model_card
from k2repro.bundle.data import data_order, ship_data
from k2repro.bundle.manifest import BUNDLE_FORMAT, BUNDLE_JSON, BUNDLE_VERSION, write_manifest
from k2repro.bundle.signing import load_private_key, sign_bundle
from k2repro.bundle.tables import (
    arrow,
    export_tables,
    write_bundle_duckdb,
    write_logical,
    write_parquet,
)
from k2repro.bundle.weights import export_checkpoints, parse_selection
from k2repro.core.atomic import atomic_dir
from k2repro.core.layout import inside_dir
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from k2repro.audit.store import Store

Progress = Callable[[str], None]


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


@dataclasses.dataclass
class _Gathered:
    """What the export read from the store and already wrote to the stage folder."""

    chain: list[dict[str, Any]]
    notes: list[str]
    what_ships: str | None
    counts: dict[str, int]
    logical: dict[str, Any]
    incomplete: list[str]
    data_info: dict[str, Any]
    order_file: bool
    order_info: dict[str, Any]
    ckpts: list[dict[str, Any]]
    env: dict[str, Any]
    git_dirty: bool | None

    @property
    def ids(self) -> list[str]:
        return [r["run_id"] for r in self.chain]


def _chain(store: Store, ref: str, say: Progress) -> list[dict[str, Any]]:
    chain = logical_chain(store, ref)
    for r in chain:
        if r["status"] == "running":
            raise BadInputError(f"run {r['run_id']} is still running: export it when it has ended")
    say(f"logical run: {' -> '.join(r['run_id'] for r in chain)}")
    return chain


def _tables(store: Store, root: Path, chain: list[dict[str, Any]], stage: Path, with_samples: bool,
            allow_incomplete: bool) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    """Every launch's tables and the logical ones into the stage; (row counts, logical tables,
    what is incomplete), refusing an incomplete run unless allowed."""
    tables, counts = export_tables(store, chain, stage, with_samples)
    logical = write_logical(tables, chain, stage)
    incomplete = incomplete_run(root, chain, logical.get("steps"))
    if incomplete and not allow_incomplete:
        raise BadInputError(f"run {chain[-1]['run_id']} is incomplete in store {root}: {incomplete[0]}"
                            + (f" (and {len(incomplete) - 1} more)" if len(incomplete) > 1 else "")
                            + "; export refuses it (--allow-incomplete ships it, saying so in the bundle)")
    return counts, logical, incomplete


def _data(store: Store, chain: list[dict[str, Any]], logical: dict[str, Any], stage: Path, data: bool,
          foreign: list[str], notes: list[str], say: Progress) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """The shipped data (or a note why not) and the data order; (data info, order written,
    order info)."""
    data_info: dict[str, Any] = {"shipped": False}
    if data:
        data_info = ship_data(store, chain, stage)
        say(f"data shipped: {data_info['bytes'] / 1e6:.2f} MB")
    elif not foreign:
        notes.append("exported with --no-data: the bundle cannot replay without the packed data")
    sample_rows = None
    if not data_info.get("shipped"):
        sample_rows = {r["run_id"]: arrow(store, "SELECT step, rank, sample_id FROM sample_stats "
                                          "WHERE run_id = ?", [r["run_id"]]) for r in chain}
    order, order_info = data_order(store, chain, logical.get("steps"), data_info.get("n_samples"), sample_rows)
    if order is not None:
        write_parquet(order, stage / "data" / "order.parquet")
    return data_info, order is not None, order_info


def _gather(store: Store, root: Path, ref: str, stage: Path, opts: dict[str, Any], say: Progress) -> _Gathered:
    """Everything the bundle takes from the store, in order: the chain, what can ship, tables,
    data, data order, checkpoints, environment facts, the root launch's `git_dirty`."""
    chain = _chain(store, ref, say)
    ids = [r["run_id"] for r in chain]
    notes: list[str] = []
    what_ships: str | None = None
    data, kind = opts["data"], opts["kind"]
    foreign = foreign_sources(chain)
    if foreign:
        n_ck = store.execute("SELECT count(*) FROM checkpoints WHERE list_contains(?, run_id)", [ids]).fetchone()[0]
        what_ships = what_ships_line(chain, foreign, int(n_ck))
        say(what_ships)
        data, kind = False, "none"
    counts, logical, incomplete = _tables(store, root, chain, stage, opts["with_samples"], opts["allow_incomplete"])
    notes += [f"INCOMPLETE: {p}" for p in incomplete]
    data_info, order_file, order_info = _data(store, chain, logical, stage, data, foreign, notes, say)
    ckpts, ck_notes = export_checkpoints(store, chain, logical.get("checkpoints"), stage, kind, opts["every"], say)
    env: dict[str, Any] = {rid: {} for rid in ids}
    for rid, rank, key, value in store.execute(
            "SELECT run_id, rank, key, value FROM env WHERE list_contains(?, run_id) ORDER BY 1, 2, 3",
            [ids]).fetchall():
        env[rid].setdefault(str(rank), {})[key] = value
    dirty = store.execute("SELECT git_dirty FROM runs_raw WHERE run_id = ? LIMIT 1", [ids[0]]).fetchone()
    return _Gathered(chain, notes + ck_notes, what_ships, counts, logical, incomplete, data_info, order_file,
                     order_info, ckpts, scrub_obj(env),  # credentials by value, also from older stores
                     None if dirty is None or dirty[0] is None else bool(dirty[0]))


def _config_files(stage: Path, chain: list[dict[str, Any]]) -> dict[str, Any]:
    """config.yaml (the first launch's) and, for a chain, configs/<run_id>.yaml; the configs."""
    import yaml

    configs = {r["run_id"]: scrub_obj(json.loads(r["config_json"])) for r in chain if r["config_json"]}
    if chain[0]["run_id"] in configs:
        (stage / "config.yaml").write_text(yaml.safe_dump(configs[chain[0]["run_id"]], sort_keys=True))
    if len(chain) > 1:
        for rid, cfg in configs.items():
            (stage / "configs").mkdir(exist_ok=True)
            (stage / "configs" / f"{rid}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    return configs


def _forensics(stage: Path, ids: list[str], reports_dir: str | Path | None) -> list[str]:
    """Copies of `<reports_dir>/<run_id>/forensics.*` under forensics/; their bundle paths."""
    out = []
    if reports_dir is not None:
        for rid in ids:
            src = Path(reports_dir) / rid
            for f in sorted(src.glob("forensics.*")) if src.is_dir() else []:
                (stage / "forensics" / rid).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, stage / "forensics" / rid / f.name)
                out.append(f"forensics/{rid}/{f.name}")
    return out


def _bundle_info(g: _Gathered, opts: dict[str, Any], forensics: list[str], fig: bool) -> dict[str, Any]:
    """bundle.json's content: the machine-readable form of the model card."""
    from k2repro import __version__

    st = g.logical.get("steps")
    rows = st is not None and st.num_rows
    return {
        "format": BUNDLE_FORMAT, "bundle_version": BUNDLE_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(), "incomplete": g.incomplete,
        "what_ships": g.what_ships,
        "k2repro_version": __version__, "schema_version": S.SCHEMA_VERSION,
        "run": {"head": g.ids[-1], "root": g.ids[0], "name": g.chain[-1]["name"],
                "chain": [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                           if k != "config_json"} for r in g.chain]},
        "steps": {"count": st.num_rows if st is not None else 0,
                  "first": int(st.column("step")[0].as_py()) if rows else None,
                  "last": int(st.column("step")[-1].as_py()) if rows else None,
                  "final_loss": st.column("loss")[-1].as_py() if rows else None},
        "checkpoints": g.ckpts, "checkpoint_selection": opts["checkpoints"], "data": g.data_info,
        "data_order": {"file": "data/order.parquet" if g.order_file else None, **g.order_info},
        "tables": g.counts, "with_samples": opts["with_samples"], "logical_tables": sorted(g.logical),
        "figures": ["figures/loss.png"] if fig else [], "forensics": forensics, "notes": g.notes,
    }


def _finish(stage: Path, g: _Gathered, opts: dict[str, Any], reports_dir: str | Path | None) -> dict[str, Any]:
    """Everything written from what was gathered: env.json, configs, forensics, the DuckDB
    file, the figure, bundle.json, README.md and MANIFEST.json. Returns bundle.json's content."""
    (stage / "env.json").write_text(json.dumps(g.env, indent=1, sort_keys=True) + "\n")
    configs = _config_files(stage, g.chain)
    forensics = _forensics(stage, g.ids, reports_dir)
    have = {t: any((stage / "tables").glob(f"*/{t}/*.parquet")) for t in S.TABLES}
    write_bundle_duckdb(stage, have, sorted(g.logical))
    fig = loss_figure(g.logical.get("steps"), g.chain, g.ckpts, g.logical.get("evals"), stage / "figures" / "loss.png")
    info = _bundle_info(g, opts, forensics, fig)
    (stage / BUNDLE_JSON).write_text(scrub_text(json.dumps(info, indent=1, sort_keys=True, default=str)) + "\n")
    (stage / "README.md").write_text(render_model_card(info, configs.get(g.ids[0], {}), g.env.get(g.ids[0], {}),
                                                       g.logical.get("evals"), git_dirty=g.git_dirty))
    write_manifest(stage, {"created_at": info["created_at"], "run": g.ids[-1], "runs": g.ids})
    return info


def _check_paths(store_root: str | Path | None, out: str | Path) -> tuple[Path, Path]:
    """(store root, bundle folder): the store exists, the bundle folder does not and lies
    outside the store; BadInputError naming them otherwise."""
    from k2repro.core.layout import default_store

    root = Path(store_root) if store_root is not None else default_store()
    if not root.is_dir():
        raise BadInputError(f"store {root} does not exist")
    out = Path(out)
    if out.exists():
        raise BadInputError(f"--out {out} already exists: the bundle goes to a new folder")
    if inside_dir(out.parent, root):
        raise BadInputError(f"--out {out} is inside store {root}: the store would read the bundle's tables as "
                            f"more rows of the run (and gc would delete them); write it elsewhere")
    return root, out


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
    from k2repro.audit.store import open_store

    say = progress or (lambda _m: None)
    kind, every = parse_selection(checkpoints)
    opts = {"kind": kind, "every": every, "checkpoints": checkpoints, "with_samples": with_samples, "data": data,
            "allow_incomplete": allow_incomplete}
    root, out = _check_paths(store_root, out)
    signing_key = load_private_key(sign) if sign is not None else None
    try:
        with atomic_dir(out, replace=False, tmp_prefix=f".{out.name}.k2tmp-") as stage:
            with open_store(root) as store:
                gathered = _gather(store, root, ref, stage, opts, say)
            info = _finish(stage, gathered, opts, reports_dir)
            if signing_key is not None:
                signed = sign_bundle(stage, signing_key)
                say(f"signed with ed25519 key {signed['fingerprint']}")
                info["signed_by"] = signed["fingerprint"]
    except FileExistsError:
        raise BadInputError(f"{out} already exists: choose another --out") from None
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {**info, "bundle": str(out), "bytes": size}


__all__ = ["export_run", "incomplete_run", "what_ships_line"]
