"""The SQL of the store's views, shared by `open_store` and the store's DuckDB database file.

Every raw table is a view over `read_parquet('<root>/**/[!.]*/<table>/*.parquet',
union_by_name=true)`: any depth below the root, skipping folders whose name starts with a dot
(staging folders of `write_run_tables`), never matching `*.parquet.tmp` segments in flight.
`runs`, `heartbeats`, `lineage` and `lineage_steps` are derived at query time; nothing is
updated in place.
"""

from __future__ import annotations

from k2repro.audit.schema import DUCKDB_TYPES, TABLES, columns

HEARTBEAT_DIR = "_heartbeat"
#: Extra seconds beyond 3 x heartbeat_s before a silent rank counts as gone.
STALE_SLACK_S = 5.0
#: The raw `runs` table is exposed as `runs_raw`; `runs` is the view with the derived status.
RAW_NAMES = {t: ("runs_raw" if t == "runs" else t) for t in TABLES}
DERIVED_VIEWS = ("heartbeats", "runs", "lineage", "lineage_steps")


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_glob(prefix: str, table: str) -> str:
    """`prefix` is the store root with a trailing slash, or '' for paths relative to
    DuckDB's `file_search_path`."""
    return f"{prefix}**/[!.]*/{table}/*.parquet"


def heartbeat_glob(prefix: str) -> str:
    return f"{prefix}**/[!.]*/{HEARTBEAT_DIR}/*.json"


def empty_select(table: str) -> str:
    """A typed 0-row SELECT: the view of a table that no file backs yet."""
    cols = ", ".join(f"CAST(NULL AS {DUCKDB_TYPES[c.type]}) AS {ident(c.name)}" for c in columns(table))
    return f"SELECT {cols} WHERE false"


def raw_view_sql(prefix: str, table: str, have_files: bool, explicit: bool = True) -> str:
    """`have_files`: at least one segment (or the store's schema stub) matches the glob;
    `explicit`: list the current schema's columns (true when the stub guarantees them)."""
    name = ident(RAW_NAMES[table])
    if not have_files:
        return f"CREATE OR REPLACE VIEW {name} AS {empty_select(table)}"
    sel = ", ".join(ident(c.name) for c in columns(table)) if explicit else "*"
    src = f"read_parquet({sql_literal(table_glob(prefix, table))}, union_by_name=true)"
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {sel} FROM {src}"


def heartbeats_view_sql(prefix: str, have_files: bool) -> str:
    if not have_files:
        return ("CREATE OR REPLACE VIEW heartbeats AS SELECT CAST(NULL AS VARCHAR) AS run_id, "
                "CAST(NULL AS INTEGER) AS rank, CAST(NULL AS BIGINT) AS pid, CAST(NULL AS VARCHAR) AS host, "
                "CAST(NULL AS DOUBLE) AS pid_start, CAST(NULL AS DOUBLE) AS heartbeat_s, "
                "CAST(NULL AS TIMESTAMP WITH TIME ZONE) AS last_beat WHERE false")
    return f"""CREATE OR REPLACE VIEW heartbeats AS
SELECT j->>'run_id' AS run_id, CAST(j->>'rank' AS INTEGER) AS rank, CAST(j->>'pid' AS BIGINT) AS pid,
       j->>'host' AS host, CAST(j->>'pid_start' AS DOUBLE) AS pid_start,
       CAST(j->>'heartbeat_s' AS DOUBLE) AS heartbeat_s, last_modified AS last_beat
FROM (SELECT TRY_CAST(content AS JSON) AS j, last_modified
      FROM read_text({sql_literal(heartbeat_glob(prefix))}))
WHERE j->>'run_id' IS NOT NULL"""


def runs_view_sql(local_host: str | None = None) -> str:
    """Status rules (docs/audit-store.md): a rank without an end marker whose heartbeat is stale
    (or, when `local_host` is given, whose process on this host is gone) -> crashed, even when
    other ranks then failed (a hard kill is the root cause: the survivors' errors are its echo);
    else any rank's end marker says failed -> failed; rank 0's end marker -> its status; no
    heartbeat at all -> crashed; else running."""
    lost = f"epoch(now()) - epoch(h.last_beat) > 3 * coalesce(h.heartbeat_s, 2.0) + {STALE_SLACK_S}"
    if local_host is not None:
        lost += f" OR (h.host = {sql_literal(local_host)} AND NOT k2_pid_alive(h.pid, h.pid_start))"
    rest = [c.name for c in TABLES["runs"] if c.name not in (
        "run_id", "name", "started_at", "parent_run_id", "resumed_from_step", "source",
        "config_hash", "git_commit", "git_dirty", "world_size")]
    rest_sql = ", ".join(f"r.{ident(c)}" for c in rest)
    return f"""CREATE OR REPLACE VIEW runs AS
WITH ends AS (
  SELECT run_id,
         bool_or(status = 'failed') AS any_failed,
         max(status) FILTER (WHERE rank = 0) AS rank0_status,
         max(ended_at) AS ended_at,
         coalesce(max(error) FILTER (WHERE rank = 0), min(error)) AS error
  FROM run_end GROUP BY run_id),
beats AS (
  SELECT h.run_id, max(h.last_beat) AS last_heartbeat,
         bool_or(e.run_id IS NULL AND coalesce({lost}, false)) AS any_lost
  FROM heartbeats h LEFT JOIN run_end e ON e.run_id = h.run_id AND e.rank = h.rank
  GROUP BY h.run_id)
SELECT r.run_id, r.name,
       CASE WHEN beats.any_lost THEN 'crashed'
            WHEN ends.any_failed THEN 'failed'
            WHEN ends.rank0_status IS NOT NULL THEN ends.rank0_status
            WHEN beats.run_id IS NULL THEN 'crashed'
            ELSE 'running' END AS status,
       r.started_at, ends.ended_at, r.parent_run_id, r.resumed_from_step, r.source, r.config_hash,
       r.git_commit, r.git_dirty, r.world_size, {rest_sql}, ends.error, beats.last_heartbeat
FROM runs_raw r LEFT JOIN ends USING (run_id) LEFT JOIN beats USING (run_id)"""


LINEAGE_SQL = """CREATE OR REPLACE VIEW lineage AS
WITH RECURSIVE r AS (
  SELECT run_id, any_value(parent_run_id) AS parent_run_id,
         any_value(resumed_from_step) AS resumed_from_step, any_value(source) AS source,
         min(started_at) AS started_at
  FROM runs_raw GROUP BY run_id),
chain(run_id, lineage_root, depth, path) AS (
  SELECT run_id, run_id, 0, [run_id] FROM r
  WHERE parent_run_id IS NULL OR parent_run_id NOT IN (SELECT run_id FROM r)
  UNION ALL
  SELECT r.run_id, chain.lineage_root, chain.depth + 1, list_append(chain.path, r.run_id)
  FROM r JOIN chain ON r.parent_run_id = chain.run_id
  WHERE NOT list_contains(chain.path, r.run_id) AND chain.depth < 10000)
SELECT r.run_id, r.parent_run_id, r.resumed_from_step, r.source, r.started_at,
       chain.lineage_root, chain.depth, chain.path AS lineage_path
FROM chain JOIN r USING (run_id)"""

# A step of run R is superseded when a (non-replay) child of R resumed from an earlier step:
# the child's steps after its resume point replace R's. Replays are not part of the
# logical run.
LINEAGE_STEPS_SQL = """CREATE OR REPLACE VIEW lineage_steps AS
SELECT l.lineage_root, l.depth, s.*
FROM steps s JOIN lineage l USING (run_id)
WHERE coalesce(l.source, 'train') <> 'replay'
  AND NOT EXISTS (
    SELECT 1 FROM runs_raw c
    WHERE c.parent_run_id = s.run_id AND coalesce(c.source, 'train') <> 'replay'
      AND c.resumed_from_step IS NOT NULL AND s.step > c.resumed_from_step)"""


def all_view_sql(prefix: str, have_files: dict[str, bool], explicit: bool,
                 local_host: str | None = None) -> list[str]:
    """Every CREATE VIEW statement, in dependency order. `have_files` has one entry per table
    plus `_heartbeat`."""
    stmts = [raw_view_sql(prefix, t, have_files.get(t, False), explicit) for t in TABLES]
    stmts.append(heartbeats_view_sql(prefix, have_files.get(HEARTBEAT_DIR, False)))
    stmts.append(runs_view_sql(local_host))
    stmts.append(LINEAGE_SQL)
    stmts.append(LINEAGE_STEPS_SQL)
    return stmts
