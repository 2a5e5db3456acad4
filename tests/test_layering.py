"""The probe is the lower layer: no module of ``kfh_probe`` imports ``attnpo_train``, not even inside a
function (design page, "Modules, by responsibility")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kfh_probe"


def imported_modules(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in ``source``, at any depth (relative imports keep
    their leading dots)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_the_import_walk_sees_imports_inside_functions():
    source = "import os\ndef f():\n    from attnpo_train.rewards import correctness\n    from ..io import x\n"
    assert imported_modules(source) == [(1, "os"), (3, "attnpo_train.rewards"), (4, "..io")]


def test_kfh_probe_imports_nothing_from_attnpo_train():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the whole package, not an empty folder
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
              for path in files for line, module in imported_modules(path.read_text(encoding="utf-8"))
              if module == "attnpo_train" or module.startswith("attnpo_train.")]
    assert upward == []
