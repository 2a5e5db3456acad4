"""The embedded model organism of overthinking: task, labeler, tokenizer, training, report.

The shipped model lives in ``kfh_probe/organism_model/`` (built by ``kfh-probe organism build``
with the default seed) and loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path


def default_model_dir() -> Path:
    """The folder of the shipped organism model."""
    return Path(__file__).resolve().parent.parent / "organism_model"
