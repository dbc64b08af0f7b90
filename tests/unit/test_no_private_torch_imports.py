"""No module of k2repro imports a private name from torch (issue 19: "no private torch calls
where a public API exists"). A private import breaks without notice on a torch upgrade; the
release bundle's DCP -> safetensors conversion once used `_load_state_dict_from_keys`, which
`torch.distributed.checkpoint`'s public `FileSystemReader.read_metadata` + `load(no_dist=True)`
replace (bundle/weights.py). Pure AST over src/: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "k2repro"


def _private_torch_imports(path: Path, root: Path = SRC.parents[1]) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            parts = (node.module or "").split(".")
            names = [a.name for a in node.names]
            if any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names):
                out.append(f"{path.relative_to(root)}:{node.lineno} from {node.module} import "
                           f"{', '.join(names)}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch" and any(p.startswith("_") for p in a.name.split(".")):
                    out.append(f"{path.relative_to(root)}:{node.lineno} import {a.name}")
    return out


def test_no_private_torch_imports() -> None:
    found = [hit for p in sorted(SRC.rglob("*.py")) for hit in _private_torch_imports(p)]
    assert not found, "private torch imports (use the public API): " + "; ".join(found)


def test_the_checker_sees_a_private_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys\n"
                 "import torch._dynamo\nfrom torch.distributed.checkpoint import load\n")
    hits = sorted(_private_torch_imports(f, tmp_path))
    assert len(hits) == 2 and "_load_state_dict_from_keys" in hits[0] and "torch._dynamo" in hits[1]
