"""Per-batch partial results of a sweep on disk, so that a sweep survives interruption and can be split
across processes.

A sweep's batches are planned once, globally (traces sorted by length, then chunked), and batch ``j``
belongs to process ``j % world_size``. Each finished batch is written atomically as its own file, so
every trace is computed in exactly the same batch whether one process or many run the sweep, and
whether it ran in one go or was resumed: the merged manifest is byte-identical.

The folder holds ``run.json`` (the key of the inputs: a rerun with other inputs starts afresh),
``batch-NNNNNN.pt`` files and ``rank-R.done`` markers.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .errors import InputError
from .io import atomic_write_bytes, atomic_write_json


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Trace indices grouped into batches of similar length (ties kept in file order)."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class PartStore:
    """The partial results of one sweep (``run_key`` identifies its inputs)."""

    def __init__(self, directory: str | Path, run_key: dict):
        self.directory = Path(directory)
        self.run_key = run_key

    def open(self, rank: int = 0) -> int:
        """Make the folder ready; returns how many batches are already done.

        Rank 0 clears a folder left by a sweep with other inputs; other ranks wait for it to agree.
        """
        key_file = self.directory / "run.json"
        if rank == 0:
            if key_file.is_file() and json.loads(key_file.read_text()) != self.run_key:
                print(f"{self.directory} holds partial results of other inputs; starting afresh", file=sys.stderr)
                shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            for marker in self.directory.glob("rank-*.done"):
                marker.unlink()
            if not key_file.is_file():
                atomic_write_json(key_file, self.run_key)
        else:
            self._wait(lambda: key_file.is_file() and json.loads(key_file.read_text()) == self.run_key, "rank 0 to prepare")
        return len(self.done())

    def done(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.directory.glob("batch-*.pt")}

    def save(self, batch: int, indices: list[int], scores: list[torch.Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save({"indices": indices, "scores": [s.contiguous() for s in scores]}, buffer)
        atomic_write_bytes(self.directory / f"batch-{batch:06d}.pt", buffer.getvalue())

    def load(self, count: int) -> list[torch.Tensor]:
        """Every trace's result, in trace order.

        Raises:
            RuntimeError: some trace has no result (a batch is missing).
        """
        results: list[torch.Tensor | None] = [None] * count
        for path in sorted(self.directory.glob("batch-*.pt")):
            part = torch.load(path, weights_only=True)
            for index, scores in zip(part["indices"], part["scores"]):
                results[index] = scores
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} traces have no partial result in {self.directory}")
        return results  # type: ignore[return-value]

    def mark_done(self, rank: int) -> None:
        atomic_write_bytes(self.directory / f"rank-{rank}.done", b"")

    def wait_for_ranks(self, world_size: int, timeout: float = 7 * 24 * 3600) -> None:
        """Block until every process has marked itself done."""
        self._wait(lambda: all((self.directory / f"rank-{r}.done").is_file() for r in range(world_size)),
                   f"all {world_size} processes to finish", timeout)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait(self, ready, what: str, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what} in {self.directory}")
            time.sleep(0.2)
