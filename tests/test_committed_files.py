"""Committed text files carry no path of the machine they were made on (reports print relative paths)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# an absolute path under a home, temp or work folder (the names spelled apart so this file does not match)
MACHINE_PATH = re.compile(r"(?<![\w.])/(home|root|tmp|private/var|Users|work)/|[A-Z]:\\Users\\")
TEXT_SUFFIXES = {".py", ".md", ".json", ".jsonl", ".ipynb", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}


def committed_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.fail(f"this test reads the committed files with git ls-files, which failed: {listed.stderr.strip()}")
    files = [ROOT / name for name in listed.stdout.splitlines()]
    return [f for f in files if f.suffix in TEXT_SUFFIXES and f.is_file()]


def test_no_committed_text_file_holds_an_absolute_machine_path():
    offenders = []
    for path in committed_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "absolute machine paths in committed files:\n" + "\n".join(offenders)
