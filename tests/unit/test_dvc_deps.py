"""Every dvc.yaml stage depends on the k2repro code its command runs (issue 19).

DVC reruns a stage only when one of its `deps` changed: a module the command imports but the
stage does not list lets `dvc repro` skip the stage after that module changed, and the
pipeline's outputs then silently come from old code. The code a command runs is found the way
tests/unit/test_architecture.py reads imports (pure AST, nothing imported), followed
transitively: every import, also inside functions, of every module reached; a package's
`__init__` for each module inside it (only its eager imports, unless the package itself is
imported); and the processes a module launches with `-m k2repro...` (the CLI's command
table, `torchrun -m k2repro.train`, `-m k2repro.eval`), which no import shows. A dep that is
a folder covers everything under it.
"""

from __future__ import annotations

import ast
import functools
import shlex
from pathlib import Path

import yaml

from tests.unit.test_architecture import SRC, _imports
from tests.unit.test_architecture import _modules as _all_modules

REPO = SRC.parent
_modules = functools.cache(_all_modules)  # module name -> file, read once
DVC_YAML = REPO / "dvc.yaml"


@functools.cache
def _commands() -> dict[str, str]:
    """`k2repro <command>` -> the module name under k2repro.cli (cli/main.py's COMMANDS)."""
    tree = ast.parse((SRC / "k2repro" / "cli" / "main.py").read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "COMMANDS":
            return {cmd: spec[0] for cmd, spec in ast.literal_eval(node.value).items()}
    raise AssertionError("cli/main.py has no COMMANDS table")


def _entry(module: str, rest: list[str]) -> list[str]:
    """The modules `python -m <module> <rest...>` starts with."""
    if module == "k2repro":
        cmd = _commands().get(rest[0]) if rest else None
        return ["k2repro.__main__"] + ([f"k2repro.cli.{cmd}"] if cmd else [])
    known = _modules()
    return [m for m in (module, f"{module}.__main__") if m in known]


def _launches(tree: ast.Module) -> list[str]:
    """Modules a file starts as processes: a list or tuple literal holding `"-m", "k2repro..."`
    (a `*name` in it is replaced by the list literal assigned to that name in the same file)."""
    lists: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    lists[t.id] = node.value.elts
    out: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.List | ast.Tuple):
            continue
        elts: list[ast.expr] = []
        for e in node.elts:
            is_list_name = isinstance(e, ast.Starred) and isinstance(e.value, ast.Name) and e.value.id in lists
            elts += lists[e.value.id] if is_list_name else [e]  # type: ignore[union-attr]
        words = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None for e in elts]
        for i, w in enumerate(words[:-1]):
            mod = words[i + 1]
            if w == "-m" and mod and (mod == "k2repro" or mod.startswith("k2repro.")):
                out += _entry(mod, [x for x in words[i + 2: i + 3] if x])
    return out


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _edges(mod: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(module-level imports, imports inside functions, launched modules) of one module."""
    mods = _modules()
    found = _imports(mod, mods[mod], set(mods))
    return (tuple(t for t, _, lazy in found if not lazy), tuple(t for t, _, lazy in found if lazy),
            tuple(_launches(ast.parse(mods[mod].read_text()))))


def _closure(entries: list[str]) -> set[str]:
    """Every k2repro module that running `entries` may execute."""
    mods = _modules()
    full: set[str] = set()  # imported itself: every import in it counts
    eager: set[str] = set()  # only run as a parent package: its module-level imports count
    todo = [(m, True) for m in entries]
    while todo:
        mod, whole = todo.pop()
        if mod in full or (not whole and mod in eager) or mod not in mods:
            continue
        (full if whole else eager).add(mod)
        todo += [(p, False) for p in _parents(mod)]
        top, lazy, launched = _edges(mod)
        todo += [(t, True) for t in (*top, *lazy, *launched) if whole or t in top]
    return full | eager


def _stage_code(cmd: str) -> tuple[set[str], list[str]]:
    """(k2repro modules the stage's command runs, script files it runs)."""
    entries: list[str] = []
    scripts: list[str] = []
    known = set(_modules())
    for part in cmd.split("&&"):
        argv = shlex.split(part)
        args = argv[1:]  # argv[0] is the interpreter (scripts/python)
        if args[:1] == ["-m"]:
            if args[1] == "k2repro":
                assert args[2:3] and args[2] in _commands(), f"dvc.yaml: {part.strip()!r} runs no k2repro command"
            entries += _entry(args[1], args[2:])
        elif args and args[0].endswith(".py"):
            scripts.append(args[0])
            path = REPO / args[0]
            tree = ast.parse(path.read_text())
            entries += [t for t, _, _ in _imports(Path(args[0]).stem, path, known)]
            entries += _launches(tree)
        else:
            raise AssertionError(f"dvc.yaml: cannot read the command {part.strip()!r}")
    return _closure(entries), scripts


def _stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


def _missing() -> dict[str, list[str]]:
    mods = _modules()
    out: dict[str, list[str]] = {}
    for name, stage in _stages().items():
        deps = [str(d) for d in stage.get("deps", [])]
        code, scripts = _stage_code(stage["cmd"])
        files = sorted({str(mods[m].relative_to(REPO)) for m in code} | set(scripts))
        gaps = [f for f in files if not _covered(f, deps)]
        if gaps:
            out[name] = gaps
    return out


def test_every_stage_depends_on_the_code_it_runs() -> None:
    missing = _missing()
    assert not missing, "dvc.yaml deps miss code the stage's command runs (dvc repro would skip the " \
        "stage after it changed): " + "; ".join(f"{s}: {', '.join(f)}" for s, f in missing.items())


def test_code_deps_exist() -> None:
    """A dep on a moved or deleted module makes `dvc repro` fail before it runs anything."""
    gone = [f"{name}: {d}" for name, stage in _stages().items() for d in stage.get("deps", [])
            if str(d).startswith(("src/", "scripts/")) and not (REPO / str(d)).exists()]
    assert not gone, f"dvc.yaml deps that do not exist: {gone}"


def test_reader_follows_launches_and_lazy_imports() -> None:
    """What the check relies on: `-m k2repro <command>` reaches the command's module, the
    trainer process started by torchrun is followed, and so are imports inside functions."""
    code, scripts = _stage_code("scripts/python scripts/pipeline_stage.py train --params params.yaml")
    assert scripts == ["scripts/pipeline_stage.py"]
    assert {"k2repro.cli.train", "k2repro.train.__main__", "k2repro.train.trainer", "k2repro.audit.sink",
            "k2repro.cli.sql", "k2repro.audit.readonly"} <= code
    evals, _ = _stage_code("scripts/python -m k2repro eval pipeline --store s")
    assert {"k2repro.cli.eval", "k2repro.eval.__main__", "k2repro.eval.runner"} <= evals
    assert "k2repro.cli.train" not in evals  # only the command's own module of the CLI table
    tree = ast.parse('PY = ["python", "-m", "k2repro"]\ndef f():\n    run([*PY, "gc", "--x"])\n'
                     'torchrun = ["x", "-m", "k2repro.train", "a=1"]\n')
    assert set(_launches(tree)) == {"k2repro.__main__", "k2repro.cli.gc", "k2repro.train", "k2repro.train.__main__"}
