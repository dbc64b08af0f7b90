"""Imports flow downward only (docs/architecture.md, "Layers"; issue 19).

Every module of `src/k2repro` belongs to a unit of the layer table below; an import (top-level,
inside a function, or under TYPE_CHECKING) may go to its own unit or to a unit of a lower
layer, never up and never sideways to another unit of the same layer. The violations that the
code has today are listed in `KNOWN`, each with its reason: the test fails on any new one, and
also when a listed one is gone, so the list can only shrink. Pure AST: nothing is imported.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

#: unit (a package, or a single module) -> its layer. Longest match wins; the root module
#: `k2repro` matches only itself.
LAYER_OF: dict[str, str] = {
    # core: the package root (__version__, the lazy open_store facade), the error types, and
    # core/ (ids, hashing, atomic files, layout, checkpoint manifests, the spike rule)
    "k2repro": "core",
    "k2repro.errors": "core",
    "k2repro.logs": "core",  # logging configured once per process, at its entry point
    "k2repro.progress": "core",  # phases and progress bars on stderr, used by train and cli
    "k2repro.core": "core",
    "k2repro.config": "config",
    "k2repro.data": "data",
    "k2repro.model": "model",
    "k2repro.distributed": "distributed",
    # audit: what both sides share (schema, redaction, run ids, segment manifests, the view
    # SQL, the package's lazy facade), then the record side and the query side apart, then
    # the store's maintenance (compaction, migration, verification)
    "k2repro.audit": "audit",
    "k2repro.audit.schema": "audit",
    "k2repro.audit.redact": "audit",
    "k2repro.audit.manifest": "audit",
    "k2repro.audit.views": "audit",
    "k2repro.audit.runrow": "audit",  # the runs row and run_end marker of every writer
    "k2repro.audit.storemeta": "audit",  # schema stubs, their stamp, the DuckDB file, store path check
    "k2repro.audit.hparams": "audit",  # the hparams rows format (written by the sink, read by Store)
    "k2repro.audit.versions": "audit",  # schema versions of a store, refusing what would be misread
    "k2repro.audit.swaps": "audit",  # the folder-swap journal and recovery of an interrupted swap
    "k2repro.audit.capability": "audit",  # what each tool can do for a run, by its runs.source
    "k2repro.audit.api": "audit.record",
    "k2repro.audit.auditrun": "audit.record",
    "k2repro.audit.layerstats": "audit.record",
    "k2repro.audit.hostvalues": "audit.record",
    "k2repro.audit.config_view": "audit.record",
    "k2repro.audit.heartbeat": "audit.record",
    "k2repro.audit.sink": "audit.record",
    "k2repro.audit.writer": "audit.record",
    "k2repro.audit.facts": "audit.record",
    "k2repro.audit.store": "audit.query",
    "k2repro.audit.readonly": "audit.query",
    "k2repro.audit.lineage": "audit.query",  # parent chains, logical runs, families, deferrals
    "k2repro.audit.compact": "audit.maintenance",
    "k2repro.audit.migrate": "audit.maintenance",
    "k2repro.audit.verify": "audit.maintenance",
    "k2repro.train": "train",
    "k2repro.importers": "importers",
    "k2repro.eval": "eval",
    "k2repro.forensics": "forensics",
    "k2repro.tools": "tools",
    "k2repro.bundle": "bundle",  # the release bundle: export, verify, import
    "k2repro.integrations": "integrations",
    "k2repro.ui": "ui",  # the run browser (k2repro ui)
    "k2repro.cli": "cli",
    "k2repro.__main__": "cli",
}

#: Lowest first. Layers in one tuple sit beside each other: they may not import one another.
ORDER: list[tuple[str, ...]] = [
    ("core",),
    ("config", "data", "model"),
    ("distributed",),
    ("audit",),
    ("audit.record", "audit.query"),
    ("audit.maintenance",),
    ("train", "importers"),
    ("eval", "forensics"),
    ("tools",),
    ("bundle",),
    ("integrations", "ui"),
    ("cli",),
]
RANK = {layer: i for i, group in enumerate(ORDER) for layer in group}

#: (importing module, imported module) -> why it is there today. Remove an entry when the
#: import goes (the test fails while a gone entry is still listed).
KNOWN: dict[tuple[str, str], str] = {}

#: A package's __init__ may re-export modules of its own package through imports inside
#: functions (k2repro.open_store, k2repro.audit's __getattr__): that is its public face.


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "k2repro").rglob("*.py"))}


def _unit(module: str) -> str | None:
    """The layer table's entry for `module`: itself or its longest listed parent package."""
    name = module
    while name:
        if name in LAYER_OF and (name != "k2repro" or module == "k2repro"):
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(module: str, path: Path, known_modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported k2repro module, line, lazy: inside a function or `if TYPE_CHECKING:`) for every
    import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    nested_ok: set[int] = set()
    for node in tree.body:  # module-level `if`/`try` blocks run at import time too, except
        # `if TYPE_CHECKING:` (never at run time: counted as lazy, like an import in a function)
        if isinstance(node, ast.If | ast.Try) and not _is_type_checking(node):
            nested_ok |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known_modules else mod for a in node.names]
        lazy = id(node) not in top and id(node) not in nested_ok
        for name in names:
            if name == "k2repro" or name.startswith("k2repro."):
                while name not in known_modules and "." in name:
                    name = name.rpartition(".")[0]
                out.append((name, node.lineno, lazy))
    return out


@functools.cache  # one AST pass for the three tests
def _violations() -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """(upward or sideways imports -> where, modules missing from the layer table)."""
    mods = _modules()
    known = set(mods)
    missing = sorted(m for m in mods if _unit(m) is None)
    bad: dict[tuple[str, str], list[str]] = {}
    for mod, path in mods.items():
        src_unit = _unit(mod)
        if src_unit is None:
            continue
        for target, line, lazy in _imports(mod, path, known):
            dst_unit = _unit(target)
            if dst_unit is None:
                continue
            if path.name == "__init__.py" and lazy and target.startswith(mod + "."):
                continue  # a package's lazy re-export of its own modules
            src_layer, dst_layer = LAYER_OF[src_unit], LAYER_OF[dst_unit]
            if src_layer != dst_layer and RANK[dst_layer] >= RANK[src_layer]:
                where = bad.setdefault((mod, target), [])
                loc = f"{path.relative_to(SRC.parent)}:{line}"
                if loc not in where:  # `from m import a, b` is one import
                    where.append(loc)
    return bad, missing


def test_every_module_has_a_layer() -> None:
    _, missing = _violations()
    assert set(LAYER_OF.values()) <= set(RANK), "a layer of LAYER_OF is missing from ORDER"
    assert not missing, f"modules not in the layer table (tests/unit/test_architecture.py LAYER_OF): {missing}"


def test_imports_flow_downward() -> None:
    bad, _ = _violations()
    new = {k: v for k, v in bad.items() if k not in KNOWN}
    assert not new, "upward or sideways imports (docs/architecture.md, Layers): " + "; ".join(
        f"{a} -> {b} at {', '.join(w)}" for (a, b), w in sorted(new.items()))


def test_known_list_only_shrinks() -> None:
    bad, _ = _violations()
    gone = sorted(k for k in KNOWN if k not in bad)
    assert not gone, f"KNOWN entries that no longer occur, remove them: {gone}"


def test_checker_sees_each_kind_of_import(tmp_path: Path) -> None:
    """The AST walk resolves what the table needs: absolute, relative, `from pkg import sub`,
    and imports inside functions (the lazy imports that keep torch out of the query tools)."""
    pkg = tmp_path / "k2repro" / "forensics"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    f = pkg / "x.py"
    f.write_text("from . import detect\nimport k2repro.tools.replay\n"
                 "def g():\n    from k2repro.cli import main\n    from ..audit import store\n")
    known = {"k2repro.forensics", "k2repro.forensics.x", "k2repro.forensics.detect",
             "k2repro.tools.replay", "k2repro.cli", "k2repro.cli.main", "k2repro.audit.store"}
    got = _imports("k2repro.forensics.x", f, known)
    assert got == [("k2repro.forensics.detect", 1, False), ("k2repro.tools.replay", 2, False),
                   ("k2repro.cli.main", 4, True), ("k2repro.audit.store", 5, True)]
    assert _unit("k2repro.forensics.x") == "k2repro.forensics"
    assert _unit("k2repro.audit.sink") == "k2repro.audit.sink"
    assert _unit("k2repro.nothere") is None
