"""Training configuration: one flat dataclass, loaded from YAML plus overrides, validated at the boundary.

Defaults follow the method page (docs/method.md, sections 5 and 6) for every method constant.
The scale settings (prompts per step, response length, steps, learning rate) default to what the
embedded model organism trains with on a CPU; the reference run's values are given beside each one.
"""

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kfh_probe import GRADERS, InputError

RHYTHM_RULES = ("project", "paper")
ESTIMATORS = ("rloo", "grpo")


@dataclass
class TrainConfig:
    """Every setting of an ``attnpo-train run``. Construction validates ranges (ValueError)."""

    # --- algorithm -----------------------------------------------------------------------------
    method: str = "attnpo"
    """The credit strategy (``attnpo_train.strategies``; any registered name). Built in: "rloo": 0/1 correctness reward (no length penalty; the group baseline is ``estimator``'s, RLOO by
    default); "tlmre": length-penalised reward; "attnpo": tlmre + stepwise advantage rescaling
    (section 6); "preplan", "anchor", "coupled": tlmre + the Preplan-and-Anchor credit strategies
    (docs/method.md): the advantage of the top ``rhythm_top`` share of tokens by WAAD rise, FAI, or their
    coupling is multiplied by ``rhythm_gain`` where it is non-negative (``rhythm_rule`` "project"; "paper"
    follows the paper's rule instead)."""
    estimator: str = "rloo"
    """Group baseline: "rloo" (leave-one-out, the reference) or "grpo" (mean/std normalisation)."""
    group_size: int = 8
    """G, rollouts per prompt (8 in the reference); at least 2."""
    alpha_len: float = 0.2
    """Length-penalty strength of the TLMRE reward, in [0, 1] (0.2 in the reference)."""
    alpha: float = 2.0
    """Exponent of p in the difficulty-aware baseline S_base = p^alpha |F|/|o| (2 in the reference)."""
    beta: float = 2.0
    """Exponent of p in the Pos-Adv attenuation magnitude (2 in the reference)."""
    delta: float = 0.0
    """Floor of the Pos-Adv gamma, in [0, 1] (0 in the reference)."""
    horizon: int = 1000
    """T of the schedule: prompt i is attenuated from step T (1 - p_i) on (1000 in the reference;
    0 attenuates from the start). Scale it with ``steps`` for short runs."""
    pos_attenuation: bool = True
    """Apply Pos-Adv Attenuation (section 6)."""
    neg_attenuation: bool = True
    """Apply Neg-Adv Attenuation (section 6)."""
    use_difficulty: bool = True
    """Use p in the baseline and the attenuation magnitude; False takes p = 1 there (ablation)."""
    top_n_heads: int | None = None
    """Number of top Key-Focus Heads whose mean score rates steps; None uses the manifest's top_n."""
    credit: str = "attention"
    """Where AttnPO's step scores come from. "attention": the top-N Key-Focus Heads (AttnPO). Research
    controls, for the embedded organism: "shuffled" permutes each response's scores among its own steps
    (same formula and fraction attenuated, no attention information); "oracle" scores steps by their
    ground-truth labels (redundant 0, essential above the baseline), the ceiling of this rescaling."""
    rhythm: str | None = None
    """``kfh-probe rhythm`` file whose header gives the local and global heads, W and the FAI range of the
    rhythm methods; None uses the organism's (``kfh_probe/data/organism_rhythm.jsonl``)."""
    rhythm_top: float = 0.4
    """Share of a response's tokens the rhythm methods credit (top by the signal), in (0, 1]."""
    rhythm_gain: float = 1.5
    """Factor on the non-negative advantage of the credited tokens, >= 1."""
    rhythm_rule: str = "project"
    """Which token rule the rhythm methods follow: "project" (the default above, docs/method.md section 8)
    or "paper" (the paper's: preplan by |WAAD_t - WAAD_{t+1}|, coupled credit back-allocated from locally
    dominated anchors to their introductory token, negative advantages scaled too;
    ``attnpo_train.strategies.preplan_anchor.PaperRule``)."""
    rhythm_alpha: float = 0.5
    """"paper" rule, "coupled": share of a locally dominated anchor's bonus handed to its introductory token, in [0, 1]."""
    rhythm_k: int = 3
    """"paper" rule, "coupled": how many tokens before an anchor are searched for its introductory token, >= 1."""
    marker: str = "</think>"
    """End-of-thinking marker that separates reasoning from the final answer."""
    grader: str = "auto"
    """Who decides correctness: "math-verify" (symbolic, for real data), "exact" (integers exactly, for
    the organism) or "auto" (exact on the organism's task, math-verify on a data file); see
    ``attnpo_train.rewards``."""
    fused_scoring: bool = True
    """AttnPO and the rhythm methods: rate the steps (read WAAD and FAI) inside the policy-gradient forward
    of each update micro-batch (the update is on-policy, so that forward's attention is the current
    policy's), with no forward of its own. False runs the separate no-grad scoring forward before the
    update instead (kept for checking: the two give the same per-token advantages up to float rounding)."""

    # --- policy loss ---------------------------------------------------------------------------
    kl_coef: float = 0.0
    """Coefficient of the k3 KL penalty against the initial policy (0 in the reference: no KL)."""

    # --- optimisation --------------------------------------------------------------------------
    lr: float = 1e-5
    """AdamW learning rate (2e-6 in the reference's 1.5B run; larger for the small organism)."""
    weight_decay: float = 0.01
    """AdamW weight decay (verl's actor default)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps, then constant (0: constant from the start)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass in scoring and the update; gradients are accumulated so the
    optimiser step and the token-mean loss are those of the whole batch (memory only, not the maths)."""
    prompts_per_step: int = 8
    """Prompts sampled per training step (128 in the reference)."""
    max_new_tokens: int = 256
    """Maximum response length in tokens (16k in the reference)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    steps: int = 200
    """Number of training steps."""
    seed: int = 0
    """Seed of every random generator."""
    device: str = "cpu"
    """Torch device of the policy."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps."""

    # --- paths ---------------------------------------------------------------------------------
    model: str | None = None
    """Policy model directory; None uses the embedded model organism."""
    manifest: str | None = None
    """KFH manifest (JSON); required for method "attnpo"; None uses the organism's manifest."""
    data: str | None = None
    """Training prompts (JSONL); None uses the organism's task."""
    out: str = "runs/attnpo"
    """Output directory: checkpoints, metrics, the final model."""
    allow_finetuned: bool = False
    """Accept a manifest whose model fingerprint differs (the policy is a fine-tune of the probed model)."""

    def __post_init__(self) -> None:
        from attnpo_train.strategies import strategy_class  # the strategies read this module

        controls = strategy_class(self.method).controls
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check(self.credit in controls, "credit", self.credit,
               f"one of {', '.join(controls)} for method {self.method!r} (the controls replace AttnPO's step scores)")
        _check(self.group_size >= 2, "group_size", self.group_size, ">= 2 (a group baseline needs two rollouts)")
        _check(0.0 <= self.alpha_len <= 1.0, "alpha_len", self.alpha_len, "in [0, 1]")
        _check(self.alpha >= 0.0, "alpha", self.alpha, ">= 0")
        _check(self.beta >= 0.0, "beta", self.beta, ">= 0")
        _check(0.0 <= self.delta <= 1.0, "delta", self.delta, "in [0, 1]")
        _check(self.horizon >= 0, "horizon", self.horizon, ">= 0")
        _check(self.top_n_heads is None or self.top_n_heads >= 1, "top_n_heads", self.top_n_heads, ">= 1 or null")
        _check(0.0 < self.rhythm_top <= 1.0, "rhythm_top", self.rhythm_top, "in (0, 1]")
        _check(self.rhythm_gain >= 1.0, "rhythm_gain", self.rhythm_gain, ">= 1")
        _check_choice("rhythm_rule", self.rhythm_rule, RHYTHM_RULES)
        _check(0.0 <= self.rhythm_alpha <= 1.0, "rhythm_alpha", self.rhythm_alpha, "in [0, 1]")
        _check(self.rhythm_k >= 1, "rhythm_k", self.rhythm_k, ">= 1")
        _check(len(self.marker) > 0, "marker", self.marker, "a non-empty string")
        _check_choice("grader", self.grader, ("auto", *GRADERS))
        _check(self.kl_coef >= 0.0, "kl_coef", self.kl_coef, ">= 0")
        _check(self.lr > 0.0, "lr", self.lr, "> 0")
        _check(self.weight_decay >= 0.0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.max_grad_norm > 0.0, "max_grad_norm", self.max_grad_norm, "> 0")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, ">= 1")
        _check(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, ">= 1")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        _check(self.temperature > 0.0, "temperature", self.temperature, "> 0")
        _check(self.steps >= 1, "steps", self.steps, ">= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, ">= 1")


def _check(ok: bool, name: str, value: Any, requirement: str) -> None:
    if not ok:
        raise InputError(f"config '{name}' must be {requirement}; got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"config '{name}' must be one of {', '.join(choices)}; got {value!r}")


_FIELD_TYPES = typing.get_type_hints(TrainConfig)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a ValueError naming it.

    Strings are accepted for numbers and booleans because command-line overrides arrive as strings and
    PyYAML reads ``1e-5`` (no decimal point) as a string.
    """
    declared = _FIELD_TYPES[name]
    optional = type(None) in typing.get_args(declared)
    base = next((t for t in typing.get_args(declared) if t is not type(None)), declared)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise InputError(f"{source}: config '{name}' must not be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise InputError(
            f"{source}: config '{name}' must be of type {base.__name__}; got {value!r}"
        ) from None


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML mapping of settings, apply ``overrides`` on top, and return a validated config.

    Unknown keys are rejected with a message that names the key, its source (the YAML file or
    "overrides") and the closest known key; values are converted to the field's type (see ``_coerce``)
    and then range-checked by ``TrainConfig``.
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
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for source, mapping in sources:
        for key, value in mapping.items():
            if key not in _FIELD_TYPES:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise InputError(f"{source}: unknown config key '{key}'{hint}")
            values[key] = _coerce(key, value, source)
    try:
        return TrainConfig(**values)
    except InputError as err:
        origin = " + ".join(source for source, mapping in sources if mapping) or "defaults"
        raise InputError(f"{origin}: {err}") from None
