"""The one resumable, multi-process batch runner: the sweep's step scores and the rhythm command's head
distances and signals go through it.

A run's work is a list of batches (lists of trace indices, planned from the inputs alone) and a function
that turns one batch into one result tensor per trace. Batch ``j`` runs on rank ``j % world_size``. With a
work folder (:class:`PartStore`) every finished batch is written atomically as its own file at once, so an
interrupted run resumes where it stopped, and every trace is computed in exactly the same batch whether one
process or many ran it, in one go or resumed: the results, and the files made from them, are identical.

The folder holds ``run.json`` (the key of the inputs: a rerun with other inputs starts afresh) and one
``STAGE-NNNNNN.pt`` per finished batch of each stage of the run (the sweep has one, ``scores``; the rhythm
command two, ``distances`` and ``signals``).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InputError
from .io import atomic_write_bytes, atomic_write_json, to_stderr

WAIT_FOR_RANKS_S = 7 * 24 * 3600  # how long a rank waits for the others' batches
WAIT_FOR_RANK_0_S = 600.0  # how long a rank waits for rank 0 to prepare the folder


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Trace indices sorted by length (ties in input order) and cut into batches of ``batch_size``, so that
    a batch's traces need little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def consecutive_batches(count: int, batch_size: int) -> list[list[int]]:
    """Trace indices ``0..count-1`` in input order, cut into batches of ``batch_size``."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def work_folder(work_dir: str | Path | None, out: str | Path | None, rank: int, world_size: int) -> Path | None:
    """Where a run keeps its finished batches: ``work_dir``, else ``OUT.parts`` beside the output ``out``;
    None (results only in memory) when neither is given.

    Raises:
        kfh_probe.errors.InputError: ``rank`` is not in ``[0, world_size)``, or several ranks have no folder to
            meet in.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
    if work_dir is None and out is None:
        if world_size > 1:
            raise InputError(f"world_size {world_size} needs work_dir or out: the ranks meet in the work folder")
        return None
    return Path(work_dir) if work_dir is not None else Path(f"{out}.parts")


class PartStore:
    """The finished batches of one run in a folder, as seen by one rank of ``world_size``.

    Args:
        directory: the work folder (:func:`work_folder`).
        run_key: everything that changes the results (JSON); a folder holding another key is started afresh.
    """

    def __init__(self, directory: str | Path, run_key: dict, rank: int = 0, world_size: int = 1):
        self.directory = Path(directory)
        self.run_key = run_key
        self.rank, self.world_size = rank, world_size

    def open(self) -> "PartStore":
        """Make the folder ready and return the store: rank 0 clears a folder left by a run with other
        inputs and writes the key; the other ranks wait until the folder holds their key."""
        key_file = self.directory / "run.json"
        if self.rank == 0:
            if key_file.is_file() and json.loads(key_file.read_text()) != self.run_key:
                print(f"{self.directory} holds partial results of other inputs; starting afresh", file=sys.stderr)
                shutil.rmtree(self.directory)
            if not key_file.is_file():
                atomic_write_json(key_file, self.run_key)
        else:
            self._wait(lambda: key_file.is_file() and json.loads(key_file.read_text()) == self.run_key,
                       "rank 0 to prepare", WAIT_FOR_RANK_0_S)
        return self

    def done(self, stage: str) -> set[int]:
        """The batches of ``stage`` already saved (by any rank)."""
        return {int(p.stem.rsplit("-", 1)[1]) for p in self.directory.glob(f"{stage}-*.pt")}

    def save(self, stage: str, batch: int, indices: list[int], results: list[torch.Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save({"indices": indices, "results": [r.contiguous() for r in results]}, buffer)
        atomic_write_bytes(self.directory / f"{stage}-{batch:06d}.pt", buffer.getvalue())

    def load(self, stage: str, count: int) -> list[torch.Tensor]:
        """Every trace's result of ``stage``, in trace order.

        Raises:
            RuntimeError: some trace has no result (a batch is missing).
        """
        results: list[torch.Tensor | None] = [None] * count
        for path in sorted(self.directory.glob(f"{stage}-*.pt")):
            part = torch.load(path, weights_only=True)
            for index, result in zip(part["indices"], part["results"]):
                results[index] = result
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} traces have no {stage} result in {self.directory}")
        return results  # type: ignore[return-value]

    def wait_for(self, stage: str, batches: int) -> None:
        """Block until every one of the ``batches`` batches of ``stage`` is saved, whichever rank ran it."""
        self._wait(lambda: len(self.done(stage) & set(range(batches))) == batches,
                   f"the {batches} batches of {stage} of all {self.world_size} ranks", WAIT_FOR_RANKS_S)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what} in {self.directory}")
            time.sleep(0.2)


def run_batches(
    stage: str,
    batches: list[list[int]],
    compute: Callable[[list[int]], list[torch.Tensor]],
    count: int,
    store: PartStore | None = None,
    everyone: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = to_stderr,
) -> list[torch.Tensor] | None:
    """Each trace's result of ``compute`` (one batch's trace indices -> one CPU tensor per trace), in trace order.

    Without a store every batch runs here, in memory. With one, this rank runs its batches (``j % world_size
    == rank``) that ``stage`` has not saved yet, saving each as it finishes; then rank 0 (every rank when
    ``everyone``) waits until all ranks' batches are saved and returns all ``count`` traces' results, and the
    other ranks return None.

    Args:
        stage: the name of this step of the run (its files' prefix and the progress bar's label).
        progress: show a progress bar; log: where the one-line resume report goes (None: nowhere).
    """
    mine = list(range(len(batches))) if store is None else [
        j for j in range(len(batches)) if j % store.world_size == store.rank
    ]
    done = set() if store is None else store.done(stage)
    finished = sum(len(batches[j]) for j in mine if j in done)
    if finished and log is not None:
        log(f"resuming {stage}: {finished} traces already done in {store.directory}")
    results: list[torch.Tensor | None] = [None] * count
    bar = tqdm(total=sum(len(batches[j]) for j in mine), initial=finished, unit="trace", desc=stage,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for j in mine:
            if j in done:
                continue
            chunk = batches[j]
            values = compute(chunk)
            if store is None:
                for i, value in zip(chunk, values, strict=True):
                    results[i] = value
            else:
                store.save(stage, j, chunk, values)
            bar.update(len(chunk))
    finally:
        bar.close()
    if store is None:
        return results  # type: ignore[return-value]
    if store.rank != 0 and not everyone:
        return None
    store.wait_for(stage, len(batches))
    return store.load(stage, count)
