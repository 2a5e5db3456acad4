"""AttnPO inside TRL: a ``GRPOTrainer`` whose advantages are the lightweight trainer's, per token.

Users who train on many GPUs keep TRL's engine (accelerate multi-process, DeepSpeed ZeRO, vLLM
generation in colocate or server mode) and swap two classes::

    from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer

    args = AttnPOConfig(output_dir="out", attnpo_manifest="manifest.json", num_generations=8)
    trainer = AttnPOGRPOTrainer(model="path/to/policy", args=args, train_dataset=dataset)  # columns: prompt, answer
    trainer.train()

What changes against ``GRPOTrainer`` (TRL 1.x), and nothing else:

- ``_generate_and_score_completions`` calls TRL's, then replaces its ``advantages`` [B] with per-token
  advantages [B, T_completion] computed by the functions of the single-machine trainer
  (``kfh_probe.sampling`` and ``attnpo_train.credit``): ``decode_responses`` of TRL's completion
  ids, ``rollout_rewards`` (correctness and the TLMRE length-penalised reward), ``group_advantages``
  (RLOO by default), ``rate_steps`` (steps cut by the manifest's segmenter and aligned on the generated
  ids, scored by the manifest's top-N Key-Focus Heads from answer rows only) and ``rescale_rollouts`` (``rescale_group``:
  difficulty-aware baseline, Pos-/Neg-Adv attenuation, schedule). For the same prompts, completions and
  weights the advantages are therefore the lightweight trainer's.
- Where the scores' attention comes from. When TRL runs a no-grad forward of the policy over the
  completions anyway, to compute ``old_per_token_logps`` (``gradient_accumulation_steps`` is not a
  multiple of ``steps_per_generation * num_iterations``, e.g. ``num_iterations > 1``; or vLLM with
  ``vllm_importance_sampling_correction``), the top-N heads' answer rows are recorded during that
  forward (``_get_per_token_logps_and_entropies``) and no forward is added. Otherwise (TRL's default
  on-policy settings) one no-grad forward per ``attnpo_micro_batch_size`` correct completions runs,
  stopped after the deepest head's layer. The two give the same advantages up to float rounding (TRL
  left-pads prompts; rotary attention depends on relative positions only), except under mixed
  precision: TRL's forward runs under bf16 autocast, the separate one in the weights' dtype. TRL's loss
  forward is not used: TRL computes the advantages before any loss forward and buffers them.
  TRL's ``_compute_loss`` takes advantages of shape (B, T) as they are (it unsqueezes only 1-D ones),
  and every TRL loss type multiplies them elementwise with the per-token ratio.
- With ``attnpo_method`` "preplan", "anchor" or "coupled" the step rating and rescaling are replaced by the
  Preplan-and-Anchor credit of ``attnpo_train.rhythm`` (WAAD and FAI, then ``rhythm_advantages``), again the
  lightweight trainer's functions. The signals come from the same place as the step scores: recorded
  during TRL's old-logps forward when it runs one (``kfh_probe.preplan_anchor.SignalRecorder``, for every
  completion of the rank, since which ones need them is known only after the rewards), else from the
  separate no-grad forward (``rollout_signals``, only the completions whose advantage needs them).
- ``_generate`` is wrapped only to keep the unpadded prompt and completion ids it returns (whatever
  produced them: ``model.generate``, transformers continuous batching, vLLM colocate or server), so
  nothing here assumes a local HF generate.
- The reward functions: TRL's reward is the 0/1 correctness (``attnpo_correct``), kept only for TRL's
  own ``reward`` metrics; the reward that drives the advantages is logged as ``attnpo/reward``.

Distributed data: a prompt group of ``num_generations`` completions may span ranks. Every rank gathers
the ids and answers of the whole generation batch (``gather_object``), computes rewards and group
advantages of all of it, rates the steps of its own correct completions (the expensive forward is
split across ranks), gathers the ratings, rescales the whole batch and keeps its slice. All ranks hold
the same numbers, so the logged ``attnpo/*`` metrics are those of the global batch.

The separate KFH forward runs on the model unwrapped from accelerate/DeepSpeed through TRL's
``unwrap_model_for_generation`` (which gathers ZeRO-3 shards into full weights on each rank, as TRL's
own generation does by default) in eval mode; the training mode and gradient checkpointing are
restored afterwards. A PEFT policy is scored with its adapters active.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from attnpo_train.advantages import group_advantages
from attnpo_train.config import RHYTHM_METHODS, TrainConfig
from attnpo_train.credit import (
    StepRating,
    answer_row_recorder,
    rate_steps,
    rescale_rollouts,
    rollout_rewards,
    scored_rating,
)
from attnpo_train.rhythm import needs_signals, paper_rule, rhythm_advantages, rollout_signals
from attnpo_train.data import Prompt
from attnpo_train.rewards import correctness
from kfh_probe.capture import attention_calls, attention_modules
from kfh_probe import check_model_matches, load_manifest, manifest_segmenter, pad_token_id, top_heads
from kfh_probe.errors import InputError
from kfh_probe.manifest import ManifestMismatchError
from kfh_probe.preplan_anchor import PreplanAnchorHeads, RhythmSignals, SignalRecorder
from kfh_probe.sampling import Rollouts, decode_responses

ANSWER_COLUMN = "answer"
"""Dataset column with each prompt's reference final answer."""
PREFIX = "attnpo_"
"""Every AttnPO field of ``AttnPOConfig`` is a ``TrainConfig`` field with this prefix."""


@dataclass
class AttnPOConfig(GRPOConfig):
    r"""Configuration of [`AttnPOGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus AttnPO's settings.

    Each AttnPO field is the field of ``attnpo_train.config.TrainConfig`` named without the ``attnpo_``
    prefix, with the same default and the same range check (the prefix keeps them apart from
    ``GRPOConfig.beta``, the KL coefficient, and ``GRPOConfig.delta``, the two-sided clip). The group
    size G is ``num_generations``. TRL's defaults already match the method page's policy loss: PPO clip
    ``epsilon=0.2``, token-mean ``loss_type="dapo"``, no KL (``beta=0.0``), no entropy bonus; TRL has no
    dual clip, which only acts off-policy (``num_iterations > 1`` or asynchronous generation).

    Parameters:
        attnpo_method (`str`, *optional*, defaults to `"attnpo"`):
            `"attnpo"` (Key-Focus-Head step rescaling) or a Preplan-and-Anchor strategy, `"preplan"`, `"anchor"`
            or `"coupled"` (docs/method.md): the same TLMRE reward, with the advantage of the top `attnpo_rhythm_top`
            share of tokens by the signal multiplied by `attnpo_rhythm_gain` where it is non-negative.
        attnpo_manifest (`str`):
            KFH manifest (JSON) of the policy's base model; required for `"attnpo"`. Checked against the model at init.
        attnpo_rhythm (`str` or `None`, *optional*, defaults to `None`):
            `kfh-probe rhythm` file of the policy's base model (its header gives the local and global heads, W and
            the FAI range); required for the rhythm methods.
        attnpo_rhythm_top (`float`, *optional*, defaults to `0.4`):
            Share of a completion's tokens the rhythm methods credit.
        attnpo_rhythm_gain (`float`, *optional*, defaults to `1.5`):
            Factor on the non-negative advantage of the credited tokens.
        attnpo_rhythm_rule (`str`, *optional*, defaults to `"project"`):
            Token rule of the rhythm methods: `"project"` or `"paper"` (the paper's own: preplan by |WAAD_t - WAAD_{t+1}|,
            coupled credit back-allocated from locally dominated anchors, negative advantages scaled too).
        attnpo_rhythm_alpha (`float`, *optional*, defaults to `0.5`):
            `"paper"` rule, `"coupled"`: share of a locally dominated anchor's bonus handed to its introductory token.
        attnpo_rhythm_k (`int`, *optional*, defaults to `3`):
            `"paper"` rule, `"coupled"`: how many tokens before an anchor are searched for its introductory token.
        attnpo_top_n_heads (`int` or `None`, *optional*, defaults to `None`):
            Number of top Key-Focus Heads whose mean score rates steps; `None` uses the manifest's `top_n`.
        attnpo_estimator (`str`, *optional*, defaults to `"rloo"`):
            Group baseline: `"rloo"` (leave-one-out, the reference) or `"grpo"` (mean/std normalisation).
        attnpo_alpha_len (`float`, *optional*, defaults to `0.2`):
            Length-penalty strength of the TLMRE reward, in [0, 1].
        attnpo_alpha (`float`, *optional*, defaults to `2.0`):
            Exponent of p in the difficulty-aware baseline S_base = p^alpha |F| / |o|.
        attnpo_beta (`float`, *optional*, defaults to `2.0`):
            Exponent of p in the Pos-Adv attenuation magnitude.
        attnpo_delta (`float`, *optional*, defaults to `0.0`):
            Floor of the Pos-Adv gamma, in [0, 1].
        attnpo_horizon (`int`, *optional*, defaults to `1000`):
            T of the schedule: prompt i is attenuated from optimizer step T (1 - p_i) on (0: from the start).
        attnpo_pos_attenuation (`bool`, *optional*, defaults to `True`):
            Apply Pos-Adv Attenuation (ablation switch).
        attnpo_neg_attenuation (`bool`, *optional*, defaults to `True`):
            Apply Neg-Adv Attenuation (ablation switch).
        attnpo_use_difficulty (`bool`, *optional*, defaults to `True`):
            Use p in the baseline and the attenuation magnitude; `False` takes p = 1 there (ablation).
        attnpo_marker (`str`, *optional*, defaults to `"</think>"`):
            End-of-thinking marker that separates reasoning from the final answer.
        attnpo_grader (`str`, *optional*, defaults to `"math-verify"`):
            Who decides correctness: `"math-verify"` (symbolic) or `"exact"` (integers exactly, the organism).
        attnpo_allow_finetuned (`bool`, *optional*, defaults to `False`):
            Accept a manifest whose weight fingerprint differs (the policy is a fine-tune of the probed
            model, or is loaded in another dtype than the probe used). The shape must match regardless.
        attnpo_micro_batch_size (`int`, *optional*, defaults to `8`):
            Sequences per KFH scoring forward on each rank (memory only, not the maths).
    """

    attnpo_method: str = field(
        default="attnpo", metadata={"help": "'attnpo', or a Preplan-and-Anchor strategy: 'preplan', 'anchor', 'coupled'."}
    )
    attnpo_manifest: str | None = field(
        default=None, metadata={"help": "KFH manifest (JSON) of the policy's base model; required for 'attnpo'."}
    )
    attnpo_rhythm: str | None = field(
        default=None, metadata={"help": "kfh-probe rhythm file of the policy's base model; required for the rhythm methods."}
    )
    attnpo_rhythm_top: float = field(default=0.4, metadata={"help": "Share of tokens the rhythm methods credit."})
    attnpo_rhythm_gain: float = field(default=1.5, metadata={"help": "Factor on the credited non-negative advantages."})
    attnpo_rhythm_rule: str = field(
        default="project", metadata={"help": "Rhythm token rule: 'project' (default) or 'paper' (the paper's own)."}
    )
    attnpo_rhythm_alpha: float = field(
        default=0.5, metadata={"help": "'paper' coupled: share of a dominated anchor's bonus handed to its intro token."}
    )
    attnpo_rhythm_k: int = field(
        default=3, metadata={"help": "'paper' coupled: tokens before an anchor searched for its intro token."}
    )
    attnpo_top_n_heads: int | None = field(
        default=None, metadata={"help": "Number of top Key-Focus Heads to use; None uses the manifest's top_n."}
    )
    attnpo_estimator: str = field(
        default="rloo", metadata={"help": "Group baseline: 'rloo' (leave-one-out) or 'grpo' (mean/std)."}
    )
    attnpo_alpha_len: float = field(default=0.2, metadata={"help": "Length-penalty strength of the TLMRE reward."})
    attnpo_alpha: float = field(default=2.0, metadata={"help": "Exponent of p in the difficulty-aware baseline."})
    attnpo_beta: float = field(default=2.0, metadata={"help": "Exponent of p in the Pos-Adv attenuation magnitude."})
    attnpo_delta: float = field(default=0.0, metadata={"help": "Floor of the Pos-Adv gamma, in [0, 1]."})
    attnpo_horizon: int = field(
        default=1000, metadata={"help": "Schedule T: prompt i is attenuated from step T * (1 - p_i) on."}
    )
    attnpo_pos_attenuation: bool = field(default=True, metadata={"help": "Apply Pos-Adv Attenuation."})
    attnpo_neg_attenuation: bool = field(default=True, metadata={"help": "Apply Neg-Adv Attenuation."})
    attnpo_use_difficulty: bool = field(
        default=True, metadata={"help": "Use the group accuracy p in the baseline and magnitude (False: p = 1)."}
    )
    attnpo_marker: str = field(default="</think>", metadata={"help": "End-of-thinking marker."})
    attnpo_grader: str = field(default="math-verify", metadata={"help": "Correctness: 'math-verify' or 'exact'."})
    attnpo_allow_finetuned: bool = field(
        default=False, metadata={"help": "Accept a manifest whose weight fingerprint differs from the policy's."}
    )
    attnpo_micro_batch_size: int = field(
        default=8, metadata={"help": "Sequences per KFH scoring forward on each rank."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attnpo_method not in ("attnpo", *RHYTHM_METHODS):
            raise InputError(f"config 'attnpo_method' must be one of attnpo, {', '.join(RHYTHM_METHODS)}; got "
                             f"{self.attnpo_method!r}")
        if self.attnpo_method == "attnpo" and self.attnpo_manifest is None:
            raise InputError("AttnPOConfig needs 'attnpo_manifest', the KFH manifest of the policy's base model")
        if self.attnpo_method in RHYTHM_METHODS and self.attnpo_rhythm is None:
            raise InputError(f"attnpo_method {self.attnpo_method!r} needs 'attnpo_rhythm', a kfh-probe rhythm file of "
                             "the policy's base model")
        if self.num_generations_eval is not None and self.num_generations_eval < 2:
            raise InputError(
                f"AttnPO's group baseline needs num_generations_eval >= 2 (or None); got {self.num_generations_eval}"
            )
        self.to_train_config(self.num_generations)  # the range checks of the lightweight trainer

    def to_train_config(self, group_size: int) -> TrainConfig:
        """The ``TrainConfig`` whose AttnPO settings these are (G = ``group_size``)."""
        values = {
            f.name[len(PREFIX) :]: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith(PREFIX)
        }
        try:
            return TrainConfig(group_size=group_size, **values)
        except InputError as err:  # name the field as it is spelled here
            message = str(err)
            for name in values:
                message = message.replace(f"config '{name}'", f"config '{PREFIX}{name}'")
            raise InputError(message) from None


class AttnPOGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with AttnPO's rewards and per-token advantages (see the module docstring).

    Args:
        model: a local model path or a loaded causal LM (``GRPOTrainer``'s ``model``).
        args: an ``AttnPOConfig``.
        train_dataset: rows with a ``prompt`` (text or conversation) and an ``answer`` column.
        eval_dataset, processing_class, callbacks, optimizers, peft_config: as in ``GRPOTrainer``.
    Raises:
        kfh_probe.manifest.ManifestError: an unreadable or invalid manifest.
        kfh_probe.manifest.ManifestMismatchError: a manifest made for another model.
        kfh_probe.capture.UnsupportedModelError: an architecture whose attention cannot be captured.
        kfh_probe.errors.InputError: a dataset without an ``answer`` column, more heads asked for than ranked.
        NotImplementedError: FSDP (use DeepSpeed ZeRO).
    """

    def __init__(
        self,
        model: str | nn.Module,
        args: AttnPOConfig,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ) -> None:
        if not isinstance(args, AttnPOConfig):
            raise TypeError(f"args must be an AttnPOConfig; got {type(args).__name__}")
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            columns = getattr(dataset, "column_names", None)
            if isinstance(columns, list) and ANSWER_COLUMN not in columns:
                raise InputError(f"{name} needs an '{ANSWER_COLUMN}' column (reference answers); it has {columns}")
        # refuse a bad file before loading any weights
        manifest = load_manifest(args.attnpo_manifest) if args.attnpo_method == "attnpo" else None
        self._attnpo_heads = [] if manifest is None else top_heads(manifest, args.attnpo_top_n_heads)
        self._attnpo_segmenter = None if manifest is None else manifest_segmenter(manifest, Path(args.attnpo_manifest).name)
        super().__init__(
            model=model,
            reward_funcs=[self.attnpo_correct],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        if self._dist.is_fsdp:
            raise NotImplementedError(
                "AttnPOGRPOTrainer does not support FSDP yet (the per-rank KFH forward would need FSDP's collective "
                "parameter gathering in lockstep); use DeepSpeed ZeRO-2 or ZeRO-3"
            )
        policy = _base_model(self.accelerator.unwrap_model(self.model))
        attention_modules(policy)  # UnsupportedModelError, by name, for attention the probe cannot capture
        self._attnpo_rhythm = None if manifest is not None else PreplanAnchorHeads.from_file(args.attnpo_rhythm, policy)
        try:
            if manifest is not None:
                check_model_matches(manifest, policy, args.attnpo_allow_finetuned, gather_params=self._dist.gather_params)
        except ManifestMismatchError as err:
            raise ManifestMismatchError(f"{err} (AttnPOConfig: attnpo_allow_finetuned=True)") from None
        self._attnpo_pad_id = pad_token_id(self._tokenizer)
        self._attnpo_generated: tuple[list[list[int]], list[list[int]]] | None = None
        self._attnpo_answers: list[Any] | None = None  # this rank's answers while a batch is generated and scored
        # ratings (attnpo) or rhythm signals read off TRL's old-logps forward
        self._attnpo_captured: list[StepRating | None] | list[RhythmSignals] | None = None

    def attnpo_correct(self, completion_ids: list[list[int]], answer: list[Any], **_: Any) -> list[float]:
        """TRL reward function: 1.0 when a completion ended with EOS and its boxed answer after the marker
        matches the reference (``attnpo_train.rewards.correctness``), else 0.0. Feeds only TRL's own
        ``reward`` metrics; the advantages come from ``attnpo_advantages``."""
        _, texts, finished = decode_responses(self._tokenizer, completion_ids, set(self.eos_token_ids))
        marker, grader = self.args.attnpo_marker, self.args.attnpo_grader
        return [
            float(done) * float(correctness([text], str(ref), marker, grader)[0])
            for text, done, ref in zip(texts, finished, answer, strict=True)
        ]

    def _generate(self, prompts: list) -> tuple:
        """TRL's ``_generate``, keeping the unpadded prompt and completion ids of this rank."""
        result = super()._generate(prompts)
        prompt_ids, completion_ids = result[0], result[1]
        self._attnpo_generated = (
            [list(map(int, ids)) for ids in prompt_ids],
            [list(map(int, ids)) for ids in completion_ids],
        )
        return result

    def old_logps_forward(self) -> bool:
        """Whether TRL runs a no-grad policy forward for ``old_per_token_logps`` (TRL 1.x's own condition);
        then the step scores are read off it, else they take a forward of their own."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's, recording the top-N heads' answer rows of this rank's correct completions when it is the
        no-grad ``old_per_token_logps`` forward of ``_generate_and_score_completions`` (the first no-grad
        call on the policy there, made only when ``old_logps_forward()``). A policy in training mode with
        attention dropout is not recorded (its scores take their own eval-mode forward), nor is anything
        for the rhythm methods (no Key-Focus Heads; their signals take their own forward)."""
        policy = _base_model(self.accelerator.unwrap_model(self.model))
        dropout = self.model.training and getattr(policy.config, "attention_dropout", 0.0)
        if ((not self._attnpo_heads and self._attnpo_rhythm is None) or self._attnpo_answers is None
                or self._attnpo_generated is None or self._attnpo_captured is not None or torch.is_grad_enabled()
                or model is not self.model or not self.old_logps_forward() or dropout):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        prompt_ids, completion_ids = self._attnpo_generated
        trimmed, _, finished = decode_responses(self._tokenizer, completion_ids, set(self.eos_token_ids))
        width = input_ids.shape[1] - logits_to_keep  # prompts are left-padded to this width
        offsets = [width - len(ids) for ids in prompt_ids]
        if self._attnpo_rhythm is not None:  # the signals of every completion: which ones need them is not known yet
            probe = self._attnpo_rhythm
            recorder = SignalRecorder(probe.heads, [width] * len(trimmed), [width + len(r) for r in trimmed],
                                      probe.window, probe.fai_range, offsets=offsets)
            with attention_calls(policy, probe.heads.layers, recorder):
                result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                    *args, **kwargs)
            recorder.check_reported(policy)
            self._attnpo_captured = recorder.signals()
            return result
        correct = torch.tensor(self.attnpo_correct(completion_ids, self._attnpo_answers))
        local = Rollouts(1, prompt_ids, trimmed, [""] * len(trimmed), finished)
        config = self.args.to_train_config(self.num_generations)
        ratings = rate_steps(None, self._tokenizer, local, correct, self._attnpo_heads, config, self._attnpo_pad_id,
                             score=False, segmenter=self._attnpo_segmenter)
        heads: dict[int, list[int]] = {}
        for layer, head in self._attnpo_heads:
            heads.setdefault(layer, []).append(head)
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, trimmed)]
        recorder = answer_row_recorder(ratings, lengths, offsets, input_ids.shape, heads, input_ids.device)
        with attention_calls(policy, sorted(heads), recorder):
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                *args, **kwargs)
        if any(r is not None for r in ratings):
            recorder.check_reported(policy)
            picked = torch.stack([recorder.results[l][:, heads[l].index(h)] for l, h in self._attnpo_heads], dim=1)
            ratings = [None if r is None else scored_rating(r, picked[b, :, offsets[b] : offsets[b] + lengths[b]],
                                                            len(prompt_ids[b])) for b, r in enumerate(ratings)]
        self._attnpo_captured = ratings
        return result

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation and scoring, then ``advantages`` [B] -> AttnPO per-token advantages [B, T_completion]."""
        self._attnpo_generated = None
        self._attnpo_answers = [row[ANSWER_COLUMN] for row in inputs]
        self._attnpo_captured = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._attnpo_answers = None
        captured, self._attnpo_captured = self._attnpo_captured, None
        if self._attnpo_generated is None:
            raise RuntimeError("TRL's _generate_and_score_completions did not call _generate; unsupported TRL version")
        prompt_ids, completion_ids = self._attnpo_generated
        self._attnpo_generated = None
        if not len(prompt_ids) == len(completion_ids) == len(inputs):
            raise RuntimeError(
                f"expected one completion per input row; got {len(inputs)} rows, {len(prompt_ids)} prompts, "
                f"{len(completion_ids)} completions (tools and rollout functions are not supported)"
            )
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        token_advantages, sequence_advantages, metrics = self.attnpo_advantages(
            prompt_ids, completion_ids, [row[ANSWER_COLUMN] for row in inputs], group_size, self.state.global_step,
            captured,
        )
        width = output["completion_ids"].shape[1]
        advantages = torch.zeros((len(token_advantages), width), dtype=torch.float32)
        for b, values in enumerate(token_advantages):
            advantages[b, : len(values)] = values
        output["advantages"] = advantages.to(output["completion_ids"].device)
        for name, value in metrics.items():
            self._metrics[mode][f"attnpo/{name}"].append(value)
        logged = self._logs["advantages"]  # the completions table shows the advantages that are used
        for _ in range(min(len(sequence_advantages), len(logged))):
            logged.pop()
        logged.extend(sequence_advantages)
        return output

    def attnpo_advantages(
        self,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        answers: list[Any],
        group_size: int,
        step: int,
        captured: list[StepRating | None] | list[RhythmSignals] | None = None,
    ) -> tuple[list[torch.Tensor], list[float], dict[str, float]]:
        """AttnPO (or rhythm-strategy) per-token advantages of this rank's completions; every rank must call it
        (collective). For the rhythm methods each rank computes the WAAD/FAI of its own positive-advantage
        completions (``rollout_signals``) and the signals are gathered before ``rhythm_advantages``.

        Args:
            prompt_ids, completion_ids, answers: this rank's B rows, unpadded, in TRL's order (the global
                batch is the ranks' rows in rank order, each prompt's G completions consecutive).
            group_size: G.
            step: completed optimizer steps (the attenuation schedule's step).
            captured: this rank's B ratings (rhythm methods: signals) read off TRL's old-logps forward; None runs
                the scoring forward.
        Returns:
            (B float32 tensors [len(completion_ids[b])], the outcome advantages A_i of the whole batch
             (for TRL's completions table), metrics of the whole batch: "reward", "accuracy",
             "advantage_abs_mean", then "rescaled_responses", "frac_attenuated", "mean_gamma" (attnpo) or
             "amplified_frac" (rhythm methods)).
        """
        config = self.args.to_train_config(group_size)
        all_prompt_ids = gather_object(prompt_ids)
        all_completion_ids = gather_object(completion_ids)
        all_answers = gather_object([str(a) for a in answers])
        if len(all_completion_ids) % group_size:
            raise RuntimeError(f"{len(all_completion_ids)} completions do not form groups of {group_size}")
        trimmed, texts, finished = decode_responses(self._tokenizer, all_completion_ids, set(self.eos_token_ids))
        rollouts = Rollouts(group_size, all_prompt_ids, trimmed, texts, finished)
        prompts = [Prompt(str(i), "", all_answers[i * group_size]) for i in range(len(trimmed) // group_size)]
        correct, rewards = rollout_rewards(rollouts, prompts, config)
        advantages = group_advantages(rewards, config.estimator)

        start = self.accelerator.process_index * len(completion_ids)
        local = slice(start, start + len(completion_ids))
        local_rollouts = Rollouts(group_size, all_prompt_ids[local], trimmed[local], texts[local], finished[local])
        metrics = {
            "reward": float(rewards.mean()),
            "accuracy": float(correct.mean()),
            "advantage_abs_mean": float(advantages.abs().mean()),
        }
        if config.method in RHYTHM_METHODS:
            # this rank's rows that need signals, then every rank's signals by global rollout index
            paper = paper_rule(config)
            needed = [i for i, a in enumerate(advantages.reshape(-1)[local].tolist()) if needs_signals(a, paper)]
            if captured is not None:
                mine = {i: captured[i] for i in needed}
            elif needed:
                with self._scoring_model() as model:
                    mine = rollout_signals(model, local_rollouts, needed, self._attnpo_rhythm, self._attnpo_pad_id,
                                           config.micro_batch_size)
            else:
                mine = {}
            signals = dict(gather_object([(start + i, s) for i, s in mine.items()]))
            token_advantages, stats = rhythm_advantages(
                advantages, rollouts, signals, config.method, config.rhythm_top, config.rhythm_gain, paper
            )
            return token_advantages[local], advantages.reshape(-1).tolist(), {**metrics, "amplified_frac": stats["amplified_frac"]}
        ratings = captured
        if ratings is None:
            with self._scoring_model() as model:
                ratings = rate_steps(
                    model, self._tokenizer, local_rollouts, correct.reshape(-1)[local], self._attnpo_heads, config,
                    self._attnpo_pad_id, segmenter=self._attnpo_segmenter,
                )
        ratings = gather_object(ratings)
        token_advantages, stats = rescale_rollouts(rollouts, correct, advantages, ratings, step, config)
        metrics.update({k: stats[k] for k in ("rescaled_responses", "frac_attenuated", "mean_gamma")})
        return token_advantages[local], advantages.reshape(-1).tolist(), metrics

    @contextlib.contextmanager
    def _scoring_model(self) -> Iterator[nn.Module]:
        """The current policy as a plain module in eval mode, for the no-grad KFH forward.

        TRL's ``unwrap_model_for_generation`` removes the accelerate/DeepSpeed wrapper, gathers ZeRO-3
        shards into full weights (always: per-rank forwards of different lengths cannot use ZeRO-3's
        collective per-layer gathering) and turns gradient checkpointing off for the block.
        """
        with unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=True,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            model = _base_model(unwrapped)
            was_training = model.training
            model.eval()
            try:
                yield model
            finally:
                model.train(was_training)


def _base_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper (adapters stay injected and active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
