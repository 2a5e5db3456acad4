"""Settings of ``attnpo-train distill``: one flat dataclass, each setting declared at its field
(``kfh_probe.settings``) and checked on construction; ``attnpo_train.config.load_config`` reads YAML and
``--set`` values into it."""

from dataclasses import dataclass

from attnpo_train.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE
from kfh_probe import OneOf, Relation, check_settings, setting

LAYER_MAPS = ("mixture", "fixed")
TEACHER_SIGNALS = ("stepwise", "shuffled")

STUDENT_PRESET = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 192,
                  "num_attention_heads": 4, "num_key_value_heads": 2}
"""The student when no --student-config is given: the teacher's config with these fields replaced (on the
organism: 2 layers instead of 4, hidden 64 instead of 128, 4 heads of 16 dimensions sharing 2 key heads)."""


def _transfer_only(default):
    """A rule: the setting keeps its default unless the transfer term acts (``transfer_weight > 0``)."""
    return Relation(lambda value, config: value == default or config.transfer_weight > 0,
                    f"{default!r} when transfer_weight is 0 (it only shapes the transfer term)")


@dataclass
class DistillConfig:
    """Every setting of an ``attnpo-train distill`` run. Construction checks each one's constraints."""

    # --- objective ----------------------------------------------------------------------------
    transfer_weight: float = setting(
        10.0, "lambda: weight of the attention-transfer loss added to the cross-entropy (0: cross-entropy only). "
        "On the organism the KL of a student trained on cross-entropy alone is about 0.02 where its cross-entropy "
        "ends near 0.3, so 10 puts the two terms at the same order (docs/method.md, section 10).",
        NON_NEGATIVE,
    )
    layer_map: str = setting(
        "mixture",
        'How student layers are aligned with teacher layers: "mixture" (a learnable softmax over the teacher\'s '
        'layers per student layer, the Mixture of Layers) or "fixed" (student layer m follows teacher layer '
        "ceil((m + 1) L_T / L_S) - 1, the ablation).",
        OneOf(LAYER_MAPS), _transfer_only("mixture"),
    )
    teacher_signal: str = setting(
        "stepwise",
        '"stepwise": the teacher\'s key mass of each step; "shuffled": the control, each trace\'s steps permuted '
        "(seeded, fixed for the run) before the mass becomes a target, so the targets keep their values and lose "
        "their steps.",
        OneOf(TEACHER_SIGNALS), _transfer_only("stepwise"),
    )

    # --- optimisation -------------------------------------------------------------------------
    steps: int = setting(600, "Optimiser steps.", AT_LEAST_ONE)
    batch_size: int = setting(8, "Traces per step (drawn without replacement, epoch by epoch).", AT_LEAST_ONE)
    lr: float = setting(2e-3, "Peak AdamW learning rate (student and mixture weights).", POSITIVE)
    warmup: int = setting(40, "Linear warm-up steps, then cosine decay to 0.", NON_NEGATIVE)
    seed: int = setting(0, "Seed of the student's initialisation, the batch order and the shuffled control.")
    device: str = setting("cpu", "Torch device of teacher and student.")

    # --- evaluation during training -------------------------------------------------------------
    eval_every: int = setting(
        0, "Greedy accuracy on `eval_problems` fresh problems of the teacher's task every this many steps "
        "(and after the last); 0: never. Needs an organism teacher.", NON_NEGATIVE,
    )
    eval_problems: int = setting(100, "Problems of each evaluation during training.", AT_LEAST_ONE)
    max_new_tokens: int = setting(320, "Response budget of those evaluations.", AT_LEAST_ONE)
    checkpoint_every: int = setting(100, "Write a resumable checkpoint every this many steps.", AT_LEAST_ONE)

    # --- paths ----------------------------------------------------------------------------------
    teacher: str | None = setting(None, "Teacher model folder; null: the embedded organism.")
    traces: str | None = setting(
        None, "The teacher's traces (JSONL, the design page's format, steps optional); null: the organism's "
        "shipped model-sampled traces.",
    )
    student_config: str | None = setting(
        None, "JSON object of model-config fields that replace the teacher's (same family and tokenizer); "
        "null: 2 layers, hidden 64, 4 heads (attnpo_train.distill.config.STUDENT_PRESET).",
    )
    out: str = setting("runs/distill", "Output directory: checkpoints, metrics, the final student.")

    def __post_init__(self) -> None:
        check_settings(self)
