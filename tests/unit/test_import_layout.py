"""The importers' shape (issue 19): the metric-name table is data, not registration calls run at
import time; the `steps` columns and their types have one home (`audit/schema.py`); and the
modules and functions of the importers, replay planning and eval planning stay small enough
to read. Pure AST and plain imports: nothing is parsed or written."""

from __future__ import annotations

import ast
from pathlib import Path

from k2repro.audit.schema import columns
from k2repro.importers import names

SRC = Path(__file__).resolve().parents[2] / "src" / "k2repro"
IMPORTERS = sorted((SRC / "importers").glob("*.py"))
SMALL = [*IMPORTERS, SRC / "tools" / "replay.py", SRC / "eval" / "runner.py"]
STEP_NAMES = {c.name for c in columns("steps")}


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def test_importer_modules_run_no_statements_at_import_time() -> None:
    """Module level holds imports, assignments, definitions and the docstring only: a table
    filled by calls (`_add("loss", ...)` then a loop) is read only by running it."""
    allowed = (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.FunctionDef, ast.ClassDef)
    found = []
    for path in IMPORTERS:
        for i, node in enumerate(ast.parse(path.read_text()).body):
            docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if not (isinstance(node, allowed) or docstring or _is_type_checking(node)):
                found.append(f"{path.name}:{node.lineno}: {type(node).__name__}")
    assert found == [], found


def test_steps_columns_and_types_come_from_the_schema() -> None:
    """Each `steps` column an import fills has the type the schema gives it, and no importer
    spells a list of `steps` columns of its own (the schema is their one home)."""
    by_type = {c.name: c.type for c in columns("steps")}
    assert {by_type[c] for c in names.STEP_FLOAT} == {"float64"}
    assert {by_type[c] for c in names.STEP_INT} == {"int64"}
    assert {by_type[c] for c in names.STEP_BOOL} == {"bool"}
    typed = {c for c, t in by_type.items() if t != "string" and c != "step"}
    assert set(names.STEP_COLUMNS) == typed and len(names.STEP_COLUMNS) == len(typed)
    lists = []
    for path in IMPORTERS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 3:
                vals = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(vals) == len(node.elts) and set(vals) <= STEP_NAMES:
                    lists.append(f"{path.name}:{node.lineno}: {vals}")
    assert lists == [], f"steps columns listed outside audit/schema.py: {lists}"


def test_every_steps_column_is_known_by_its_own_name() -> None:
    table = names.NameMap.build()
    for c in names.STEP_COLUMNS:
        assert table.target(c) == (c, 1.0)
    assert table.target("elapsed time per iteration (ms)") == ("step_time_s", 1e-3)
    assert table.target(" LM Loss ") == ("loss", 1.0)


def test_modules_and_functions_stay_small() -> None:
    """docs/architecture.md: no module over 500 lines, no function over 80."""
    big = []
    for path in SMALL:
        text = path.read_text()
        if len(text.splitlines()) > 500:
            big.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    big.append(f"{path.name}::{node.name}: {n} lines")
    assert big == [], big
