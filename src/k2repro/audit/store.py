"""Query side of the audit store: `open_store(path)` -> Store, a DuckDB connection with one
view per table over every run folder at any depth below the root.

Views re-glob the Parquet segments on every query, so a Store sees runs while they write (new
segments appear; `*.parquet.tmp` files in flight never match). Importing this module does not
import torch, pandas or pyarrow: `k2repro sql` and `k2repro runs` stay fast.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.audit.hparams import parse_hparam
from k2repro.audit.storemeta import check_store_path, ensure_store, store_meta_current
from k2repro.audit.swaps import pending_swaps, recover_swaps
from k2repro.audit.versions import check_store
from k2repro.audit.views import HEARTBEAT_DIR, all_view_sql, heartbeat_glob, sql_literal, table_glob
from k2repro.core.layout import RUN_MARKER, default_store
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import duckdb
    import pandas as pd

log = logging.getLogger(__name__)

#: Times a query is run again when a segment vanished under it (a folder swap).
VANISHED_RETRIES = 5


def _pid_alive(pid: int | None, pid_start: float | None) -> bool | None:
    """Is the process that wrote a heartbeat still there? Compares the start time too, so a
    recycled pid does not keep a dead run 'running'."""
    if pid is None:
        return None
    import psutil

    try:
        p = psutil.Process(int(pid))
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if pid_start is not None and abs(p.create_time() - float(pid_start)) > 1.0:
            return False
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists but not ours to inspect


# DuckDB messages of a segment read that raced a writer, or of a damaged segment
_TRANSIENT = ("No such file", "Invalid data", "don't know what type", "Could not read enough bytes",
              "TProtocolException", "No magic bytes", "too small to be a Parquet file", "Invalid Input Error: File",
              "Payload value bigger than allowed")  # a damaged footer's Thrift lengths
_SEGMENT = re.compile(r"'([^']+\.parquet)'")


class Store:
    """An open audit store. `con` is a DuckDB connection holding the views."""

    def __init__(self, root: Path, con: duckdb.DuckDBPyConnection, sandboxed: bool) -> None:
        self.root = root
        self.con = con
        self.sandboxed = sandboxed
        self.retries = 0  # queries run again because a segment vanished under them
        self._tmpdir: str | None = None  # the sandbox's private DuckDB temp folder

    # -- raw access
    def execute(self, query: str, params: list | dict | None = None) -> duckdb.DuckDBPyConnection:
        """Run a query and return the DuckDB result (fetchall()/fetchdf()/arrow()).

        Two races are retried: a segment that vanished between DuckDB's listing and its read
        (`gc`, compaction: see audit/compact.py), and a segment that a sink replaced by a longer
        version between DuckDB reading its footer and scanning it (the open segment is rewritten
        under its name: the new file is whole, the read mixed two versions). A segment that stays
        unreadable (truncated, not Parquet) is reported as bad input naming the file."""
        import duckdb

        for attempt in range(VANISHED_RETRIES + 1):
            try:
                return self.con.execute(query, params) if params is not None else self.con.execute(query)
            except duckdb.Error as exc:
                msg = str(exc)
                if not any(t in msg for t in _TRANSIENT):
                    raise
                if attempt < VANISHED_RETRIES:
                    self.retries += 1
                    time.sleep(0.005 * (attempt + 1))
                    continue
                m = _SEGMENT.search(msg)
                where = f"segment {m.group(1)}" if m else "a segment"
                raise BadInputError(f"store {self.root}: {where} is unreadable "
                                    f"({msg.splitlines()[0][:200]})") from None
        raise AssertionError("unreachable")

    def sql(self, query: str, params: list | dict | None = None) -> pd.DataFrame:
        """Run a query, return a pandas DataFrame (parameters, never string formatting)."""
        return self.execute(query, params).df()

    def tables(self) -> list[str]:
        return [r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]

    # -- helpers other tools use
    def runs(self) -> pd.DataFrame:
        """Every run with its derived status, oldest first."""
        return self.sql("SELECT * FROM runs ORDER BY started_at, run_id")

    def run(self, run_id: str) -> dict[str, Any]:
        """The `runs` row of one run (id, name or unique prefix) as a dict; BadInputError if
        the store has no such run."""
        run_id = self.resolve_run_id(run_id)
        cur = self.con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        row = cur.fetchone()
        if row is None:
            raise BadInputError(f"no run '{run_id}' in store {self.root}")
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def resolve_run_id(self, ref: str) -> str:
        """An exact run id, else an exact run name, else a unique run id prefix.

        A name wins over a prefix because run ids start with the run's name: after one replay
        (`<name>-replay-...`) the name is a prefix of two ids. Runs sharing a name (a resumed
        run keeps it) resolve to the one whose parent is not among them: a child never steals
        its parent's name."""
        rows = self.con.execute("SELECT DISTINCT run_id, name, parent_run_id FROM runs_raw").fetchall()
        ids = {r[0] for r in rows}
        if ref in ids:
            return ref
        named = sorted({r[0] for r in rows if r[1] == ref})
        if len(named) > 1:
            parent = {r[0]: r[2] for r in rows}
            named = [i for i in named if parent.get(i) not in named] or named
        hits = named or sorted(i for i in ids if i.startswith(ref))
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise BadInputError(f"no run '{ref}' in store {self.root}")
        raise BadInputError(f"run '{ref}' is ambiguous in store {self.root}: {', '.join(hits[:5])}")

    def _need_run(self, run_id: str) -> str:
        """The run id `run_id` names (an id, a name or a unique prefix, as the CLI resolves it)."""
        return self.resolve_run_id(run_id)

    def steps(self, run_id: str) -> pd.DataFrame:
        """The run's `steps` rows ordered by step."""
        run_id = self._need_run(run_id)
        return self.sql("SELECT * FROM steps WHERE run_id = ? ORDER BY step", [run_id])

    def layer_stats(self, run_id: str, step: int | None = None) -> pd.DataFrame:
        run_id = self._need_run(run_id)
        q = "SELECT * FROM layer_stats WHERE run_id = ?" + (" AND step = ?" if step is not None else "")
        return self.sql(q + " ORDER BY step, param", [run_id] + ([step] if step is not None else []))

    def sample_stats(self, run_id: str, step: int | None = None) -> pd.DataFrame:
        run_id = self._need_run(run_id)
        q = "SELECT * FROM sample_stats WHERE run_id = ?" + (" AND step = ?" if step is not None else "")
        return self.sql(q + " ORDER BY step, batch_pos, sample_id", [run_id] + ([step] if step is not None else []))

    def events(self, run_id: str, kind: str | None = None) -> pd.DataFrame:
        run_id = self._need_run(run_id)
        q = "SELECT * FROM events WHERE run_id = ?" + (" AND kind = ?" if kind else "")
        return self.sql(q + " ORDER BY time", [run_id] + ([kind] if kind else []))

    def checkpoints(self, run_id: str) -> pd.DataFrame:
        run_id = self._need_run(run_id)
        return self.sql("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id])

    def hparams(self, run_id: str) -> dict[str, Any]:
        """Dotted key -> typed value (floats exact), as the run resolved its config."""
        run_id = self._need_run(run_id)
        rows = self.con.execute("SELECT key, value, value_type FROM hparams WHERE run_id = ? ORDER BY key",
                                [run_id]).fetchall()
        return {k: parse_hparam(v, t) for k, v, t in rows}

    def env(self, run_id: str, rank: int = 0) -> dict[str, str]:
        run_id = self._need_run(run_id)
        rows = self.con.execute("SELECT key, value FROM env WHERE run_id = ? AND rank = ? ORDER BY key",
                                [run_id, rank]).fetchall()
        return dict(rows)

    def run_dirs(self) -> list[Path]:
        """Folders holding a run (a `_run.json` marker), at any depth; staging folders skipped."""
        out: list[Path] = []
        if not self.root.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(self.root):
            if RUN_MARKER in filenames:
                out.append(Path(dirpath))
                dirnames[:] = []  # a run folder holds tables, not runs
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in S.TABLES]
        return sorted(out)

    def close(self) -> None:
        self.con.close()
        if self._tmpdir:
            import shutil

            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | Path | None = None, *, sandbox: bool = False, check_version: bool = True) -> Store:
    """Open the store at `path` (default `$K2REPRO_STORE`, else `runs`) for queries.

    A missing or empty store answers every view with 0 typed rows. `sandbox=True` (used by
    `k2repro sql`) then locks the connection down: no file access outside the store, no
    extension install/load, no configuration changes."""
    import duckdb

    root = check_store_path(Path(path) if path is not None else default_store())
    if check_version and root.is_dir():  # a newer store, or an older one read wrongly: refuse (audit/versions.py)
        check_store(root)
    if root.is_dir():  # an interrupted compaction is finished or rolled back before any query
        if pending_swaps(root):
            for msg in recover_swaps(root):
                log.warning("store %s: %s", root, msg)
    con = duckdb.connect(":memory:", config={
        "autoinstall_known_extensions": "false", "autoload_known_extensions": "false"})
    con.execute("SET TimeZone = 'UTC'")
    con.create_function("k2_pid_alive", _pid_alive, ["BIGINT", "DOUBLE"], "BOOLEAN",
                        null_handling="special", side_effects=True)
    exists = root.is_dir()
    current = exists and store_meta_current(root)
    if exists and not current:
        try:  # a store written by hand or by an older version: add the stubs + DuckDB file
            ensure_store(root)
            current = True
        except OSError:
            current = False
    prefix = str(root.resolve()) + os.sep if exists else ""
    if current:
        have = {t: True for t in S.TABLES} | {HEARTBEAT_DIR: True}
    elif exists:  # read-only store without stubs: type the views that no file backs yet
        have = {}
        for t in [*S.TABLES, HEARTBEAT_DIR]:
            pattern = heartbeat_glob(prefix) if t == HEARTBEAT_DIR else table_glob(prefix, t)
            have[t] = con.execute(f"SELECT count(*) FROM glob({sql_literal(pattern)})").fetchone()[0] > 0
    else:
        have = {}
    store = Store(root, con, sandbox)
    for stmt in all_view_sql(prefix, have, explicit=current, local_host=socket.gethostname()):
        store.execute(stmt)  # binding a view reads segment footers: same races, same errors
    if sandbox:
        # DuckDB spills to `<cwd>/.tmp` by default, a folder `read_text` could then reach: a
        # private folder (0700) of this process instead, removed by close().
        import tempfile

        store._tmpdir = tempfile.mkdtemp(prefix="k2repro-sql-")
        con.execute(f"SET temp_directory = {sql_literal(store._tmpdir)}")
        allowed = [str(root.resolve()) + os.sep] if exists else []
        con.execute(f"SET allowed_directories = [{', '.join(sql_literal(a) for a in allowed)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return store
