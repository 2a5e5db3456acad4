"""The probe is the lower layer: no module of ``kfh_probe`` imports ``attnpo_train``, not even inside a
function, and ``attnpo_train`` uses only the names ``kfh_probe`` exports in ``__all__`` (design page, "Modules,
by responsibility")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kfh_probe"
TRAINER = PACKAGE.parent / "attnpo_train"


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


def probe_names_used(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` of every use of ``kfh_probe`` in ``source``, at any depth: ``kfh_probe.<module>`` for an
    import of a submodule, ``kfh_probe:<name>`` for a name imported from the package or read off it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("kfh_probe.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            if node.module == "kfh_probe":
                found += [(node.lineno, f"kfh_probe:{alias.name}") for alias in node.names]
            elif node.module.startswith("kfh_probe."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kfh_probe":
            found.append((node.lineno, f"kfh_probe:{node.attr}"))
    return found


def test_the_probe_walk_sees_submodules_names_and_attributes():
    source = ("import kfh_probe\nimport kfh_probe.io\ndef f():\n    from kfh_probe import Rollouts, _x\n"
              "    from kfh_probe.sampling import Rollouts\n    return kfh_probe.__file__\n")
    assert probe_names_used(source) == [(2, "kfh_probe.io"), (4, "kfh_probe:Rollouts"), (4, "kfh_probe:_x"),
                                        (5, "kfh_probe.sampling"), (6, "kfh_probe:__file__")]


def test_attnpo_train_imports_only_the_probes_public_names():
    import kfh_probe

    public = set(kfh_probe.__all__)
    files = sorted(TRAINER.rglob("*.py"))
    assert len(files) > 15  # the whole package, not an empty folder
    used = [(path, line, what) for path in files for line, what in probe_names_used(path.read_text(encoding="utf-8"))]
    assert len(used) > 20  # the walk sees the trainer's uses of the probe
    private = [f"{path.relative_to(TRAINER.parent)}:{line}: {what}" for path, line, what in used
               if not what.startswith("kfh_probe:") or what.split(":", 1)[1] not in public]
    assert private == []
