"""Random state, checkpoints and the final model of a ``train`` run.

``capture_rng``/``restore_rng`` cover every generator a step draws from; ``deferred_interrupt`` holds a
Ctrl-C until a block has finished, so a checkpoint (written to a temporary folder, then ``os.replace``d)
and the final model are never left half-written; ``check_resumable`` refuses a resume whose settings
would change the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attnpo_train.config import TrainConfig
from kfh_probe import InputError, atomic_write_json, atomic_write_jsonl

RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device", "out", "fused_scoring", "gradient_checkpointing")
"""Config fields a resumed run may change; any other difference is refused (``fused_scoring`` changes
where the step scores are computed, not what they are; ``gradient_checkpointing`` what the update keeps in
memory, not what it computes)."""
KEEP_CHECKPOINTS = 2
"""Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
_CHECKPOINT_DIR = re.compile(r"^step-(\d{8})$")


def capture_rng(data_rng: random.Random) -> dict:
    """Every random generator a step draws from: python, numpy, torch (CPU and CUDA), the prompt sampler."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data": data_rng.getstate(),
    }


def restore_rng(state: dict, data_rng: random.Random) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_rng.setstate(state["data"])


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block has finished, then raise KeyboardInterrupt.

    Outside the main thread signals cannot be handled, and the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint folder with the highest step, or None (temporary folders are ignored)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_DIR.match(p.name)))
    return found[-1][1] if found else None


def save_checkpoint(
    out: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: dict,
    metrics: list[dict],
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write ``out/checkpoints/step-XXXXXXXX/`` atomically (a temporary folder, then ``os.replace``).

    Contents: ``state.pt`` (model, optimiser and scheduler state dicts, float16's loss-scaler state when
    ``scaler`` is given, random states, step),
    ``metrics.jsonl`` (every metrics line so far), ``config.json``. Keeps the newest
    ``KEEP_CHECKPOINTS`` checkpoints.
    """
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with deferred_interrupt():
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "rng": rng,
            },
            tmp / "state.pt",
        )
        atomic_write_jsonl(tmp / "metrics.jsonl", metrics)
        atomic_write_json(tmp / "config.json", dataclasses.asdict(config))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted(p for p in root.iterdir() if _CHECKPOINT_DIR.match(p.name))
        for old in complete[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, list[dict], dict]:
    """(state from ``state.pt``, metrics lines, saved config as a dict) of a checkpoint folder."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return state, metrics, saved


def resume_from(out: str | Path, config, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, data_rng: random.Random,
                scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[dict], dict]:
    """Load the newest checkpoint in ``out`` into ``model``, ``optimizer``, ``scheduler`` and ``data_rng``
    (and float16's loss ``scaler``, when given and the checkpoint saved one).

    Returns:
        (the checkpoint's step, its metrics lines, its random states as ``capture_rng`` wrote them, plus
        whatever the caller saved beside them).
    Raises:
        ResumeError: no checkpoint, or the config differs from the checkpoint's (``check_resumable``).
    """
    path = latest_checkpoint(out)
    if path is None:
        raise ResumeError(f"--resume: no checkpoint in {checkpoint_root(out)}")
    state, metrics, saved = load_checkpoint(path)
    check_resumable(saved, config, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], data_rng)
    return state["step"], metrics, state["rng"]


class ResumeError(InputError):
    """A resume whose settings differ from the checkpoint's in a way that would change the run."""


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume with settings that would change the run (only ``RESUMABLE_CHANGES`` may differ).

    A setting the checkpoint does not record counts as its default.

    Raises:
        ResumeError: naming every differing setting with both values.
    """
    current = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    recorded = {k: saved[k] if k in saved else defaults.get(k) for k in current}
    changed = [
        f"{k}: checkpoint {recorded[k]!r}, now {current[k]!r}"
        for k in current
        if k not in RESUMABLE_CHANGES and recorded[k] != current[k]
    ]
    if changed:
        raise ResumeError(f"cannot resume from {path}: the config differs in " + "; ".join(changed))


def save_final(model: nn.Module, tokenizer, out: str | Path, organism_task: str | None = None) -> Path:
    """Save the policy and tokenizer as a Hugging Face folder ``out/final`` (atomically replaced); a
    policy trained on an organism task (``organism_task``) records it, as a built organism does."""
    final = Path(out) / "final"
    tmp = Path(out) / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if organism_task is not None:
        from kfh_probe import write_task_file

        write_task_file(tmp, organism_task)
    with deferred_interrupt():
        if final.exists():
            old = Path(out) / f".old-final-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    return final
