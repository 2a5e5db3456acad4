"""The embedded model organisms of overthinking: task, labeler, tokenizer, training, report.

Two organisms ship, one per task version (:data:`ORGANISMS`): v4 in ``kfh_probe/organism_model/`` and
v5 in ``kfh_probe/organism_model_v5/`` (each built by ``kfh-probe organism build`` with the default
seed; they load with ``AutoModelForCausalLM.from_pretrained``). A built folder names its task version
in :data:`TASK_FILE`, so a command given the folder writes and labels that task's problems.
"""

from __future__ import annotations

import json
from pathlib import Path

ORGANISMS = ("v4", "v5")
"""The shipped organisms, by the task version they were trained on."""
DEFAULT_ORGANISM = "v4"
"""The organism every command uses when none is named."""
TASK_FILE = "organism_task.json"
"""The file of a built organism folder that names its task version (``{"task": "v5"}``)."""

_PACKAGE = Path(__file__).resolve().parent.parent


def _suffix(organism: str) -> str:
    if organism not in ORGANISMS:
        from kfh_probe.errors import InputError

        raise InputError(f"unknown organism {organism!r}; choose one of {', '.join(ORGANISMS)}")
    return "" if organism == "v4" else f"_{organism}"


def default_model_dir(organism: str = DEFAULT_ORGANISM) -> Path:
    """The folder of the shipped organism model of this task version."""
    return _PACKAGE / f"organism_model{_suffix(organism)}"


def organism_option(organism: str | None, model: str | Path | None) -> str | None:
    """The rule of the commands' ``--organism`` and ``--model`` options: the organism to run on
    (``organism``, else :data:`DEFAULT_ORGANISM`) when no model is given, None when one is.

    Raises:
        kfh_probe.errors.InputError: both are given.
    """
    if model is None:
        return organism or DEFAULT_ORGANISM
    if organism is not None:
        from kfh_probe.errors import InputError

        raise InputError("--organism names an embedded model; give it or --model, not both")
    return None


def write_task_file(folder: str | Path, task: str) -> None:
    """Record in a built organism folder which task version it was trained on."""
    (Path(folder) / TASK_FILE).write_text(json.dumps({"task": task}) + "\n", encoding="utf-8")


def task_of(model_dir: str | Path) -> str:
    """The task version an organism folder was trained on (v4 for a folder without :data:`TASK_FILE`)."""
    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        return "v4"
    task = json.loads(path.read_text(encoding="utf-8")).get("task", "v4")
    _suffix(task)
    return task


def built_model_dir(organism: str = DEFAULT_ORGANISM) -> Path:
    """:func:`default_model_dir`, checked like any ``--model`` folder (:func:`kfh_probe.loading.model_folder`).

    Raises:
        kfh_probe.loading.ModelFolderError: the organism is not built there (the message says how to
            build it), or its ``config.json`` is broken.
    """
    from kfh_probe.loading import ModelFolderError, model_folder

    path = default_model_dir(organism)
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"the embedded organism model is not built (no {path / 'config.json'}): "
                               "run `kfh-probe organism build`, or pass --model DIR")
    return model_folder(path)


def default_traces_path(organism: str = DEFAULT_ORGANISM) -> Path:
    """The organism's shipped ground-truth-labeled, model-sampled traces (the sweep's default input).

    Made by ``kfh-probe organism traces --source model --n 300 --seed 0 --out <this path>``.
    """
    return _PACKAGE / "data" / f"organism{_suffix(organism)}_traces.jsonl"


def default_manifest_path(organism: str = DEFAULT_ORGANISM) -> Path:
    """The KFH manifest of the shipped organism (the trainer's default), made by ``kfh-probe sweep``."""
    return _PACKAGE / "data" / f"organism{_suffix(organism)}_manifest.json"


def default_rhythm_path(organism: str = DEFAULT_ORGANISM) -> Path:
    """The organism's Preplan-and-Anchor signals on its traces (header: local/global heads), made by
    ``kfh-probe rhythm --out <this path>`` (the rhythm methods' default)."""
    return _PACKAGE / "data" / f"organism{_suffix(organism)}_rhythm.jsonl"
