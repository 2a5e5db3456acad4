"""Atomic file output: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from .errors import InputError


def to_stderr(message: str) -> None:
    """Print a one-line report on stderr (the default ``log`` of the long runs)."""
    print(message, file=sys.stderr)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a report prints it: relative to the working directory when it lies under it, else just
    its name, so that no report (or committed file made from one) holds a machine's absolute path."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.name


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse an output path that is a folder (callers with long work check it before the work).

    Raises:
        kfh_probe.errors.InputError: naming the path.
    """
    if Path(path).is_dir():
        raise InputError(f"{path}: cannot write the output there, it is a folder")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    Raises:
        kfh_probe.errors.InputError: ``path`` is a folder, or its folder cannot be made or written to.
    """
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (PermissionError, FileExistsError, NotADirectoryError) as err:
        raise InputError(f"{path}: cannot write the output there ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, so equal objects give equal bytes."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_write_png(path: str | os.PathLike, figure, dpi: int = 110) -> None:
    """Write a matplotlib ``figure`` as PNG, atomically (rendered in memory first)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, error: type[InputError] = InputError) -> Any:
    """The JSON value in the file ``path``.

    Raises:
        error: naming the file, when it cannot be read or is not valid JSON (with line and column).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def jsonl_records(
    path: str | os.PathLike, what: str, error: type[InputError] = InputError
) -> Iterator[tuple[int, dict | None, str | None]]:
    """Each non-blank line of the JSONL file ``path`` as ``(line number, record, problem)``: the decoded
    JSON object and None, or None and why the line is not one (not valid JSON, or JSON but no object).
    The one reader of the project's JSONL inputs (traces, problems, prompts); each caller checks the
    fields of its own format and reports every bad line at once.

    Raises:
        error: ``"<what> not found: <path>"`` when there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, None, f"not valid JSON ({err.msg} at column {err.colno})"
                continue
            if isinstance(record, dict):
                yield line_no, record, None
            else:
                yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
