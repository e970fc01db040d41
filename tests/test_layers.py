"""The layer rule of DESIGN.md, checked on the source: client -> disk -> proto <- disk <- service;
client and service never import each other; proto imports neither torch nor zmq, nor any other
layer; disk imports neither torch nor zmq."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("proto", "disk", "client", "service")
ALLOWED: Dict[str, Set[str]] = {
    "proto": {"proto"},
    "disk": {"proto", "disk"},
    "client": {"proto", "disk", "client"},
    "service": {"proto", "disk", "service"},
}
FORBIDDEN_LIBRARIES: Dict[str, Set[str]] = {"proto": {"torch", "zmq"}, "disk": {"torch", "zmq"}}


def imported_modules(path: Path) -> List[str]:
    """Every module a source file imports (absolute names; relative imports are not used here)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.append(node.module or "")
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_what_the_design_allows(layer: str) -> None:
    files = sorted((REPO / layer).glob("*.py"))
    assert files, f"no modules in {layer}/"
    wrong = []
    for path in files:
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "ckptd" and len(parts) > 1 and parts[1] not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
            if parts[0] in FORBIDDEN_LIBRARIES.get(layer, set()):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom ckptd.client.saving import CheckpointClient\n")
    assert imported_modules(bad) == ["torch", "ckptd.client.saving"]
