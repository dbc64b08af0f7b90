"""The run's audit tables in a bundle: `tables/<run_id>/<table>/*.parquet` for every launch of
the lineage chain (a small store of its own, so the bundle imports as the same runs),
`logical/<table>.parquet` stitched along the chain (a child's steps superseding its parent's
after the step it resumed from: the store's `lineage_steps` rule), and `k2repro.duckdb`, views
over both for plain `duckdb` users. Every table is written in the store's explicit schema."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.bundle.manifest import BUNDLE_FORMAT

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from k2repro.audit.store import Store

#: Tables with a `step` column: stitched along a lineage chain.
STEP_TABLES = ("steps", "layer_stats", "sample_stats", "checkpoints", "evals")


def arrow(store: Store, query: str, params: list) -> pa.Table:
    """The query's rows as an Arrow table (DuckDB's old and new method names)."""
    import warnings

    res = store.execute(query, params)
    with warnings.catch_warnings():  # "an extra copy of the rows": small tables, and it keeps the retry
        warnings.simplefilter("ignore")
        return res.to_arrow_table() if hasattr(res, "to_arrow_table") else res.fetch_arrow_table()


def write_parquet(tbl: pa.Table, path: Path) -> None:
    """One Parquet file, scrubbed of secrets by value (a store from before by-value scrubbing)."""
    import pyarrow.parquet as pq

    from k2repro.audit.redact import scrub_table
    from k2repro.audit.storemeta import COMPRESSION

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(scrub_table(tbl), path, compression=COMPRESSION)


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
            tbl = arrow(store, f"SELECT {cols} FROM {ident(RAW_NAMES[table])} WHERE run_id = ?{_order_by(table)}",
                        [rid]).cast(schema)
            got.setdefault(table, {})[rid] = tbl
            counts[table] = counts.get(table, 0) + tbl.num_rows
            if tbl.num_rows:
                write_parquet(tbl, rdir / table / "r0-00000000.parquet")
    return got, counts


def stitch(per_run: dict[str, pa.Table], chain: list[dict[str, Any]]) -> pa.Table | None:
    """One table of the logical run: each launch's rows up to its `cut`, sorted by step."""
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


def write_logical(tables: dict[str, dict[str, pa.Table]], chain: list[dict[str, Any]],
                  dest: Path) -> dict[str, pa.Table]:
    """`logical/<table>.parquet` for every step table with rows; returns them by name."""
    logical: dict[str, pa.Table] = {}
    for t in STEP_TABLES:
        if t in tables:
            st = stitch(tables[t], chain)
            if st is not None:
                logical[t] = st
                write_parquet(st, dest / "logical" / f"{t}.parquet")
    return logical


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


__all__ = ["STEP_TABLES", "arrow", "write_parquet", "export_tables", "stitch", "write_logical",
           "write_bundle_duckdb"]
