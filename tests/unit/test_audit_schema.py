"""Schema: explicit Arrow types, exact float round trip, empty/missing stores, docs in step."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2repro.audit import schema as S
from k2repro.audit.store import open_store
from k2repro.audit.storemeta import ensure_store
from k2repro.audit.writer import to_arrow, write_segment

REPO = Path(__file__).resolve().parents[2]


def test_every_table_has_run_id_and_an_explicit_schema():
    assert S.SCHEMA_VERSION >= 1
    for name in S.TABLES:
        sch = S.arrow_schema(name)
        assert sch.names[0] == "run_id" and not sch.field("run_id").nullable
        assert sch.metadata[b"k2repro.table"] == name.encode()
    design = {"runs", "hparams", "env", "data_manifest", "steps", "layer_stats", "sample_stats",
              "checkpoints", "events", "evals", "spikes"}
    assert design <= set(S.TABLES)
    # the design's minimum columns
    assert {"step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s", "loss_min",
            "loss_max", "loss_std", "logz_mean", "skipped", "batch_hash"} <= set(S.column_names("steps"))
    assert S.arrow_schema("steps").field("loss").type == pa.float64()


def test_round_trip_is_bit_exact_through_parquet_and_duckdb(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal(64).astype(np.float32)
    losses = [float(x) for x in f32] + [float("nan"), float("inf"), -0.0, 5e-324]
    n = len(losses)
    tbl = to_arrow("steps", {"step": list(range(1, n + 1)), "loss": losses,
                             "skipped": [i % 2 for i in range(n)], "time": [1.7e9 + i for i in range(n)]},
                   "r1")
    assert tbl.schema.equals(S.arrow_schema("steps"), check_metadata=False)
    assert tbl.column("grad_norm").null_count == n  # missing nullable columns are NULL
    ensure_store(tmp_path)
    write_segment(tmp_path / "r1" / "steps", "r0-00000000.parquet", tbl)
    back = pq.read_table(tmp_path / "r1" / "steps" / "r0-00000000.parquet")
    assert back.schema.equals(S.arrow_schema("steps"), check_metadata=False)
    with open_store(tmp_path) as st:
        got = st.execute("SELECT loss, skipped FROM steps ORDER BY step").fetchall()
    bits = [struct.pack("<d", v) for v, _ in got]
    assert bits == [struct.pack("<d", v) for v in losses]
    assert [s for _, s in got] == [bool(i % 2) for i in range(n)]


def test_conversion_errors_name_the_column():
    with pytest.raises(ValueError, match="unknown column"):
        to_arrow("steps", {"step": [1], "los": [1.0]}, "r1")
    with pytest.raises(ValueError, match="steps.step: required"):
        to_arrow("steps", {"loss": [1.0]}, "r1")
    with pytest.raises(ValueError, match="differ in length"):
        to_arrow("steps", {"step": [1, 2], "loss": [1.0]}, "r1")
    with pytest.raises(ValueError, match="rows of other runs"):
        to_arrow("steps", {"run_id": ["x"], "step": [1]}, "r1")
    with pytest.raises(ValueError, match="steps.tokens.*not an integer"):
        to_arrow("steps", {"step": [1], "tokens": [2.5]}, "r1")
    ok = to_arrow("steps", {"step": [1.0, 2], "tokens": [512.0, None], "skipped": ["false", "true"]}, "r1")
    assert ok.column("tokens").to_pylist() == [512, None]
    assert ok.column("skipped").to_pylist() == [False, True]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "stubbed"])
def test_empty_or_missing_store_reads_zero_typed_rows(tmp_path, kind):
    root = tmp_path / "store"
    if kind == "empty_dir":
        root.mkdir()
    elif kind == "stubbed":
        ensure_store(root)
    with open_store(root) as st:
        for name in [*S.TABLES, "heartbeats", "lineage", "lineage_steps"]:
            view = "runs_raw" if name == "runs" else name
            assert st.execute(f"SELECT count(*) FROM {view}").fetchone()[0] == 0
        types = dict(st.execute("SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = 'steps'").fetchall())
        assert types["loss"] == "DOUBLE" and types["step"] == "BIGINT"
        assert st.runs().empty and "status" in st.runs().columns
    assert root.exists() == (kind != "missing")  # opening never creates a missing store


DOC = REPO / "docs" / "audit-store.md"


def _doc_section(text: str, heading: str) -> str:
    """The body of `heading` (a `## ` line) up to the next `## ` heading."""
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    nxt = text.find("\n## ", start)
    return text[start: nxt if nxt >= 0 else None]


def _doc_tables(section: str) -> dict[str, list[tuple[str, str, str]]]:
    """`### <table>` heading -> its markdown rows (column, type, meaning); `\\|` is a literal pipe."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for m in re.finditer(r"^### `([^`]+)`\n(.*?)(?=^### |\Z)", section, re.M | re.S):
        rows = []
        for line in m.group(2).splitlines():
            if line.startswith("| `"):
                cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                assert len(cells) == 3, f"docs: table {m.group(1)}: row {line!r} has {len(cells)} cells, not 3"
                rows.append((cells[0].strip("`"), cells[1], cells[2]))
        out[m.group(1)] = rows
    return out


def test_docs_list_exactly_the_schema_tables_and_columns():
    """docs/audit-store.md is the one home of tables and columns for people: its "Tables"
    section lists exactly schema.py's tables, in order, each with exactly its columns, in
    order, with the DuckDB type, NOT NULL where the column is required, and the column's doc
    (a "; since schema N" note may be added)."""
    tables = _doc_tables(_doc_section(DOC.read_text(), "## Tables"))
    assert list(tables) == list(S.TABLES), "docs: the tables listed differ from audit/schema.py"
    for name, cols in S.TABLES.items():
        want = [(c.name, S.DUCKDB_TYPES[c.type] + ("" if c.nullable else " NOT NULL"), c.doc) for c in cols]
        got = [(col, type_, re.sub(r"; since schema \d+", "", meaning)) for col, type_, meaning in tables[name]]
        assert [g[0] for g in got] == [w[0] for w in want], f"docs: columns of {name} differ from audit/schema.py"
        for g, w in zip(got, want, strict=True):
            assert g == w, f"docs: {name}.{w[0]} is {g[1:]}, audit/schema.py says {w[1:]}"


def test_docs_list_exactly_the_derived_views_columns(tmp_path):
    """The "Derived views" list names every column each derived view has, as an empty store's
    views (audit/views.py) report them; "every column of T" stands for T's columns."""
    section = _doc_section(DOC.read_text(), "## Tables")
    derived = section[section.index("### Derived views"):]
    documented: dict[str, set[str]] = {}
    for view, rest in re.findall(r"^- `(\w+)`: (.*?)(?=^- |^\s*$)", derived, re.M | re.S):
        names: set[str] = set()
        for ref in re.findall(r"every column of `(\w+)`", rest):
            names |= set(S.column_names("runs" if ref == "runs_raw" else ref))
        rest = re.sub(r"every column of `\w+`", "", rest)
        for chunk in re.findall(r"`([^`]+)`", rest):
            names |= {n.strip() for n in chunk.split(",")}
        documented[view] = names
    with open_store(tmp_path / "missing") as st:
        views = set(st.tables()) - {"runs_raw"} - (set(S.TABLES) - {"runs"})  # `runs` is derived
        actual = {v: {r[0] for r in st.execute("SELECT column_name FROM information_schema.columns "
                                               "WHERE table_name = ?", [v]).fetchall()} for v in views}
    assert set(documented) == set(actual), "docs: the derived views listed differ from the store's"
    for view, cols in actual.items():
        assert documented[view] == cols, f"docs: view {view}: missing {sorted(cols - documented[view])}, " \
                                         f"not there {sorted(documented[view] - cols)}"


def test_docs_example_queries_run(tmp_path):
    from k2repro.audit.readonly import check_read_only
    from k2repro.audit.writer import write_run_tables

    n = 1500
    rng = np.random.default_rng(1)
    loss = 3 + 0.01 * rng.standard_normal(n)
    loss[700] = 9.0
    ratio = np.full((n // 10, 2), 1e-3)
    ratio[80, 1] = 0.5
    for run in ("RUN", "OTHER"):
        write_run_tables(tmp_path, run, {
            "runs": {"name": [run]},
            "steps": {"step": list(range(1, n + 1)), "loss": loss.tolist(), "grad_norm": rng.random(n).tolist()},
            "layer_stats": {"step": [s for s in range(10, n + 1, 10) for _ in range(2)],
                            "param": ["w1", "w2"] * (n // 10), "update_ratio": ratio.ravel().tolist()},
            "sample_stats": {"step": [100] * 3, "rank": [0, 1, 1], "sample_id": [5, 6, 7], "loss": [1.0, 2.0, 3.0]},
            "hparams": {"key": ["optim.lr"], "value": ["0.1" if run == "RUN" else "0.2"], "value_type": ["float"]},
            "spikes": {"onset_step": [700], "peak_step": [701], "class": ["transient"]},
        })
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 5
    results = []
    with open_store(tmp_path) as st:
        for block in blocks:
            for stmt in block.split(";"):
                code = "\n".join(ln for ln in stmt.splitlines() if not ln.strip().startswith("--"))
                if not code.strip():
                    continue
                check_read_only(stmt)
                results.append(st.execute(stmt).fetchall())
    flat = str(results)
    assert "701" in flat  # first spike from the spikes table; step 701 from steps alone
    assert any(r and r[0][:2] == (701, 9.0) for r in results)
    assert any(r and r[0][:2] == (810, "w2") for r in results)  # the layer whose ratio jumped
    assert any(r and r[0] == ("optim.lr", "0.1", "0.2") for r in results)
