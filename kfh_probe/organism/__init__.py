"""The embedded model organism of overthinking: task, labeler, tokenizer, training, report.

The shipped model lives in ``kfh_probe/organism_model/`` (built by ``kfh-probe organism build``
with the default seed) and loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path


def default_model_dir() -> Path:
    """The folder of the shipped organism model."""
    return Path(__file__).resolve().parent.parent / "organism_model"


def built_model_dir() -> Path:
    """:func:`default_model_dir`, checked like any ``--model`` folder (:func:`kfh_probe.loading.model_folder`).

    Raises:
        kfh_probe.loading.ModelFolderError: the organism is not built there (the message says how to
            build it), or its ``config.json`` is broken.
    """
    from kfh_probe.loading import ModelFolderError, model_folder

    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"the embedded organism model is not built (no {path / 'config.json'}): "
                               "run `kfh-probe organism build`, or pass --model DIR")
    return model_folder(path)


def default_traces_path() -> Path:
    """The organism's shipped ground-truth-labeled, model-sampled traces (the sweep's default input).

    Made by ``kfh-probe organism traces --source model --n 300 --seed 0 --out <this path>``.
    """
    return Path(__file__).resolve().parent.parent / "data" / "organism_traces.jsonl"


def default_manifest_path() -> Path:
    """The KFH manifest of the shipped organism (the trainer's default), made by ``kfh-probe sweep``."""
    return Path(__file__).resolve().parent.parent / "data" / "organism_manifest.json"


def default_rhythm_path() -> Path:
    """The organism's Preplan-and-Anchor signals on its traces (header: local/global heads), made by
    ``kfh-probe rhythm --out <this path>`` (the rhythm methods' default)."""
    return Path(__file__).resolve().parent.parent / "data" / "organism_rhythm.jsonl"
