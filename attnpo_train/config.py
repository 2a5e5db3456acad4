"""Training configuration: one flat dataclass, loaded from YAML plus overrides, checked at the boundary.

Each setting is declared once, at its field (``kfh_probe.settings.setting``): default, help and
constraints. Construction checks them (``kfh_probe.settings.check_settings``); ``load_config`` converts YAML and
``--set`` values to the fields' types first. Defaults follow the method page (docs/method.md, sections 5
and 6) for every method constant. The scale settings (prompts per step, response length, steps,
learning rate) default to what the embedded model organism trains with on a CPU; the reference run's
values are given in their help.
"""

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kfh_probe import GRADERS, InputError, Interval, NonEmpty, OneOf, Relation, SettingError, check_settings, coerce_setting, setting

RHYTHM_RULES = ("project", "paper")
ESTIMATORS = ("rloo", "grpo")
BASELINES = ("uniform", "reasoning")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS_DTYPES = ("float32", "bfloat16")

POSITIVE = Interval(0, None, closed="neither")
NON_NEGATIVE = Interval(0, None)
AT_LEAST_ONE = Interval(1, None)
UNIT = Interval(0, 1)


def _registered_methods() -> tuple[str, ...]:
    """The method names the strategy registry knows, read when a config is checked."""
    from attnpo_train.strategies import methods  # the strategies import this module

    return methods()


def _method_controls(method: str) -> tuple[str, ...]:
    """The ``credit`` values ``method``'s strategy accepts (``("attention",)`` for a name it does not know,
    which the ``method`` check reports)."""
    from attnpo_train.strategies import methods, strategy_class

    return strategy_class(method).controls if method in methods() else ("attention",)


@dataclass
class TrainConfig:
    """Every setting of an ``attnpo-train run``. Construction checks each one's constraints (SettingError)."""

    # --- algorithm -----------------------------------------------------------------------------
    method: str = setting(
        "attnpo",
        'The credit strategy (attnpo_train.strategies; any registered name). Built in: "rloo": 0/1 correctness reward (no length penalty; the group baseline is `estimator`\'s, RLOO by '
        'default); "tlmre": length-penalised reward; "attnpo": tlmre + stepwise advantage rescaling '
        '(section 6); "preplan", "anchor", "coupled": tlmre + the Preplan-and-Anchor credit strategies '
        "(docs/method.md): the advantage of the top `rhythm_top` share of tokens by WAAD rise, FAI, or their "
        'coupling is multiplied by `rhythm_gain` where it is non-negative (`rhythm_rule` "project"; "paper" '
        "follows the paper's rule instead).",
        OneOf(_registered_methods),
    )
    estimator: str = setting(
        "rloo", 'Group baseline: "rloo" (leave-one-out, the reference) or "grpo" (mean/std normalisation).',
        OneOf(ESTIMATORS),
    )
    group_size: int = setting(
        8, "G, rollouts per prompt (8 in the reference); a group baseline needs two.", Interval(2, None)
    )
    alpha_len: float = setting(0.2, "Length-penalty strength of the TLMRE reward (0.2 in the reference).", UNIT)
    alpha: float = setting(
        2.0, "Exponent of p in the difficulty-aware baseline S_base = p^alpha * bar (2 in the reference).",
        NON_NEGATIVE,
    )
    baseline: str = setting(
        "uniform",
        'What a step score is compared with. "uniform": the paper\'s S_base = p^alpha |F|/|o|, the score of '
        'uniform attention over every key. "reasoning": each head\'s step scores relative to its own mean over '
        "the reasoning tokens, averaged over the heads, against p^alpha tau, with the margin tau the sweep "
        "calibrated on its labeled traces (the manifest's `margins`; docs/method.md section 6).",
        OneOf(BASELINES),
    )
    beta: float = setting(2.0, "Exponent of p in the Pos-Adv attenuation magnitude (2 in the reference).", NON_NEGATIVE)
    delta: float = setting(0.0, "Floor of the Pos-Adv gamma (0 in the reference).", UNIT)
    horizon: int = setting(
        1000,
        "T of the schedule: prompt i is attenuated from step T (1 - p_i) on (1000 in the reference; 0 "
        "attenuates from the start). Scale it with the number of steps for short runs.",
        NON_NEGATIVE,
    )
    pos_attenuation: bool = setting(True, "Apply Pos-Adv Attenuation (section 6).")
    neg_attenuation: bool = setting(True, "Apply Neg-Adv Attenuation (section 6).")
    use_difficulty: bool = setting(
        True, "Use p in the baseline and the attenuation magnitude; false takes p = 1 there (ablation)."
    )
    top_n_heads: int | None = setting(
        None, "Number of top Key-Focus Heads whose mean score rates steps; null uses the manifest's top_n.",
        AT_LEAST_ONE,
    )
    credit: str = setting(
        "attention",
        'Where AttnPO\'s step scores come from. "attention": the top-N Key-Focus Heads (AttnPO). Research '
        'controls, for the embedded organism: "shuffled" permutes each response\'s scores among its own steps '
        '(same formula and fraction attenuated, no attention information); "oracle" scores steps by their '
        "ground-truth labels (redundant 0, essential above the baseline), the ceiling of this rescaling.",
        Relation(lambda credit, config: credit in _method_controls(config.method),
                 "one of the method's controls ('attention'; 'attnpo' also 'shuffled' and 'oracle', which replace "
                 "its step scores)"),
    )
    rhythm: str | None = setting(
        None,
        "kfh-probe rhythm file whose header gives the local and global heads, W and the FAI range of the "
        "rhythm methods; null uses the organism's (kfh_probe/data/organism_rhythm.jsonl, organism_v5_rhythm.jsonl "
        "for a v5 folder).",
    )
    rhythm_top: float = setting(
        0.4, "Share of a response's tokens the rhythm methods credit (top by the signal).",
        Interval(0, 1, closed="right"),
    )
    rhythm_gain: float = setting(1.5, "Factor on the non-negative advantage of the credited tokens.", Interval(1, None))
    rhythm_rule: str = setting(
        "project",
        'Which token rule the rhythm methods follow: "project" (docs/method.md section 8) or "paper" (the '
        "paper's: preplan by |WAAD_t - WAAD_{t+1}|, coupled credit back-allocated from locally dominated "
        "anchors to their introductory token, negative advantages scaled too; attnpo_train.strategies.preplan_anchor.PaperRule).",
        OneOf(RHYTHM_RULES),
    )
    rhythm_alpha: float = setting(
        0.5, '"paper" rule, "coupled": share of a locally dominated anchor\'s bonus handed to its introductory token.',
        UNIT,
    )
    rhythm_k: int = setting(
        3, '"paper" rule, "coupled": how many tokens before an anchor are searched for its introductory token.',
        AT_LEAST_ONE,
    )
    marker: str = setting("</think>", "End-of-thinking marker that separates reasoning from the final answer.", NonEmpty())
    grader: str = setting(
        "auto",
        'Who decides correctness: "math-verify" (symbolic, for real data), "exact" (integers exactly, for the '
        'organism) or "auto" (exact on the organism\'s task, math-verify on a data file or dataset).',
        OneOf(("auto", *GRADERS)),
    )
    fused_scoring: bool = setting(
        True,
        "AttnPO and the rhythm methods: rate the steps (read WAAD and FAI) inside the policy-gradient forward "
        "of each update micro-batch, with no forward of its own (the update is on-policy, so that forward's "
        "attention is the current policy's). False runs a separate no-grad scoring forward before the update "
        "instead (for checking: the two give the same per-token advantages up to float rounding).",
    )

    # --- policy loss ---------------------------------------------------------------------------
    kl_coef: float = setting(
        0.0, "Coefficient of the k3 KL penalty against the initial policy (0 in the reference: no KL).", NON_NEGATIVE
    )

    # --- optimisation --------------------------------------------------------------------------
    lr: float = setting(1e-5, "AdamW learning rate (2e-6 in the reference's 1.5B run; larger for the small organism).", POSITIVE)
    weight_decay: float = setting(0.01, "AdamW weight decay (verl's actor default).", NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "Gradient-norm clipping threshold.", POSITIVE)
    warmup_steps: int = setting(
        0, "Linear learning-rate warm-up over this many steps, then constant (0: constant from the start).",
        NON_NEGATIVE,
    )
    micro_batch_size: int = setting(
        8,
        "Sequences per forward pass of the policy (scoring, and the update with accumulated gradients: the "
        "optimiser step and the token-mean loss are those of the whole batch); memory only, not the maths.",
        AT_LEAST_ONE,
    )
    prompts_per_step: int = setting(8, "Prompts sampled per training step (128 in the reference).", AT_LEAST_ONE)
    max_new_tokens: int = setting(256, "Maximum response length in tokens (16k in the reference).", AT_LEAST_ONE)
    temperature: float = setting(1.0, "Sampling temperature of the rollouts.", POSITIVE)
    steps: int = setting(200, "Number of training steps.", AT_LEAST_ONE)
    seed: int = setting(0, "Seed of every random generator.")
    device: str = setting("cpu", "Torch device of the policy.")
    checkpoint_every: int = setting(50, "Write a resumable checkpoint every this many steps.", AT_LEAST_ONE)

    # --- precision and memory (attnpo_train.precision) -------------------------------------------
    dtype: str = setting(
        "float32",
        'Compute dtype of the policy\'s forwards (rollouts and the update). "bfloat16" or "float16": mixed precision, '
        "the forwards run under torch.autocast while the weights and AdamW's states stay in `weights_dtype` "
        '(float32 by default); "float16" also scales the loss (torch.amp.GradScaler). "float32": no autocast. Step '
        "scores, rhythm signals, log-probabilities and the loss are float32 whatever this is.",
        OneOf(COMPUTE_DTYPES),
    )
    weights_dtype: str = setting(
        "float32",
        'Storage dtype of the policy\'s weights, gradients and AdamW states. "bfloat16" halves their memory but '
        "rounds every weight update to bfloat16's 8-bit mantissa: an update smaller than about 1/256 of a weight is "
        "lost (at lr 2e-6 most are), so training can stall; use it only where float32 weights do not fit.",
        OneOf(WEIGHTS_DTYPES),
        Relation(lambda weights, config: weights == "float32" or config.dtype == weights,
                 '"float32", or equal to `dtype` (bfloat16 weights compute in bfloat16)'),
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers' "
        "activation checkpointing, non-reentrant): less activation memory for long responses, about one more "
        "forward of update time. The update's forward then runs in training mode (transformers checkpoints only "
        "there), so a policy with active dropout is refused. Attention is read in the forward, never in its "
        "recomputation.",
    )

    # --- paths ---------------------------------------------------------------------------------
    model: str | None = setting(None, "Policy model directory; null uses the embedded model organism.")
    manifest: str | None = setting(
        None, 'KFH manifest (JSON) of the policy\'s base model, for method "attnpo"; null uses the organism\'s manifest.'
    )
    data: str | None = setting(None, "Training prompts (JSONL); null uses the organism's task.")
    out: str = setting("runs/attnpo", "Output directory: checkpoints, metrics, the final model.")
    allow_finetuned: bool = setting(
        False,
        "Accept a manifest whose weight fingerprint differs (the policy is a fine-tune of the probed model, or "
        "is loaded in another dtype than the probe used); the shape must match regardless.",
    )

    def __post_init__(self) -> None:
        check_settings(self)


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None, cls: type = TrainConfig) -> Any:
    """Read a YAML mapping of settings, apply ``overrides`` on top, and return a checked config.

    Unknown keys are rejected with a message that names the key, its source (the YAML file or
    "overrides") and the closest known key; values are converted to the field's type
    (``kfh_probe.settings.coerce_setting``) and then checked by ``cls`` (``TrainConfig``, or another settings
    dataclass such as ``attnpo_train.distill.config.DistillConfig``). Every message starts with the source the
    bad value came from.
    """
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if yaml_path is not None:
        try:
            with open(yaml_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as err:
            raise InputError(f"{yaml_path}: cannot read the config file ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise InputError(f"{yaml_path}: not valid YAML ({' '.join(str(err).split())})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(
                f"{yaml_path}: a config file must be a YAML mapping of key: value; got {type(loaded).__name__}"
            )
        sources.append((str(yaml_path), loaded))
    sources.append(("overrides", dict(overrides or {})))
    known = [f.name for f in dataclasses.fields(cls)]
    for source, mapping in sources:
        for key, value in mapping.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise InputError(f"{source}: unknown config key '{key}'{hint}")
            try:
                values[key] = coerce_setting(cls, key, value)
            except InputError as err:
                raise InputError(f"{source}: {err}") from None
    try:
        return cls(**values)
    except SettingError as err:
        origin = " + ".join(source for source, mapping in sources if mapping) or "defaults"
        raise InputError(f"{origin}: {err}") from None
