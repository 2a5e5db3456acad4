"""AttnPO inside TRL: a ``GRPOTrainer`` whose advantages are the single-machine trainer's, per token.

Users who train on many GPUs keep TRL's engine (accelerate multi-process, DeepSpeed ZeRO, vLLM
generation in colocate or server mode) and swap two classes::

    from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer

    args = AttnPOConfig(output_dir="out", attnpo_manifest="manifest.json", num_generations=8)
    trainer = AttnPOGRPOTrainer(model="path/to/policy", args=args, train_dataset=dataset)  # columns: prompt, answer
    trainer.train()

What the subclass changes, and nothing else:

- ``_generate_and_score_completions`` calls TRL's, then replaces its sequence advantages ``[completion]``
  with per-token advantages ``[completion, completion_token]`` computed by the single-machine trainer's
  functions: the rewards (correctness and the TLMRE length penalty), the group advantages, then
  AttnPO's step rescaling or a Preplan-and-Anchor credit. The same completions and weights give the
  single-machine trainer's advantages.
- The heads' attention is read during TRL's no-grad old-logps forward when TRL runs one
  (``old_logps_forward``), else during a no-grad forward of its own, stopped after the deepest head's
  layer. Both give the same advantages up to float rounding, except under mixed precision, where
  TRL's forward runs under autocast (``docs/trl/README.md`` has the table).
- ``_generate`` is wrapped only to keep the unpadded prompt and completion ids it returns, whatever
  produced them (HF generate, continuous batching, vLLM).
- TRL's reward is the 0/1 correctness (``attnpo_correct``), kept for TRL's own ``reward`` metrics; the
  reward that drives the advantages is logged as ``attnpo/reward``.

Distributed data: a prompt group of ``num_generations`` completions may span ranks. Every rank gathers
the ids and answers of the whole generation batch, computes rewards and group advantages of all of it,
reads the attention of its own completions (the expensive forward is split across ranks), gathers the
results, computes the per-token advantages of the whole batch and keeps its slice. All ranks hold the
same numbers, so the logged ``attnpo/*`` metrics are those of the global batch.

The separate forward runs in eval mode on the policy unwrapped from accelerate/DeepSpeed, with ZeRO-3
shards gathered into full weights on each rank; a PEFT policy is read with its adapters active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
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
from kfh_probe import (
    OneOf, Relation, SettingError, check_model_matches, check_settings, help_of, load_manifest, manifest_segmenter,
    pad_token_id, top_heads,
)
from kfh_probe.errors import InputError
from kfh_probe.grading import resolve_grader
from kfh_probe.manifest import ManifestMismatchError
from kfh_probe.preplan_anchor import PreplanAnchorHeads, RhythmSignals, SignalRecorder
from kfh_probe.sampling import Rollouts, decode_responses

ANSWER_COLUMN = "answer"
"""Dataset column with each prompt's reference final answer."""
PREFIX = "attnpo_"
"""Every AttnPO field of ``AttnPOConfig`` is a ``TrainConfig`` field with this prefix."""
TRAIN_SETTINGS = (
    "method", "manifest", "rhythm", "rhythm_top", "rhythm_gain", "rhythm_rule", "rhythm_alpha", "rhythm_k",
    "top_n_heads", "estimator", "alpha_len", "alpha", "beta", "delta", "horizon", "pos_attenuation",
    "neg_attenuation", "use_difficulty", "marker", "grader", "allow_finetuned", "micro_batch_size",
)
"""The ``TrainConfig`` settings the adapter reads, each an ``attnpo_<name>`` field of ``AttnPOConfig``. TRL's
own fields stand for the others: ``num_generations`` is the group size, ``learning_rate``, ``max_steps``,
``temperature``, ``max_completion_length``, ``epsilon`` (the clip) and ``beta`` (the KL coefficient)."""
ADAPTER_CONSTRAINTS = {
    "method": (OneOf(("attnpo", *RHYTHM_METHODS)),),
    "manifest": (Relation(lambda manifest, config: manifest is not None or config.method != "attnpo",
                          "given when attnpo_method is 'attnpo' (the KFH manifest of the policy's base model)"),),
    "rhythm": (Relation(lambda rhythm, config: rhythm is not None or config.method not in RHYTHM_METHODS,
                        f"given when attnpo_method is one of {', '.join(RHYTHM_METHODS)} (a kfh-probe rhythm file "
                        "of the policy's base model)"),),
}
"""What the adapter asks of those settings beyond ``TrainConfig``'s constraints: the per-token strategies
only, and the heads' file named (the organism's default files are the single-machine trainer's)."""


def _train_settings(cls: type) -> type:
    """Give ``cls`` (before ``@dataclass``) one ``attnpo_<name>`` field per ``TRAIN_SETTINGS`` entry, with the
    ``TrainConfig`` field's type, default and help."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    types = typing.get_type_hints(TrainConfig)
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for name in TRAIN_SETTINGS:
        annotations[PREFIX + name] = types[name]
        setattr(cls, PREFIX + name, field(default=fields[name].default, metadata={"help": help_of(fields[name])}))
    cls.__annotations__ = annotations
    return cls


@dataclass
@_train_settings
class AttnPOConfig(GRPOConfig):
    r"""Configuration of [`AttnPOGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus AttnPO's settings.

    Each AttnPO field is the ``attnpo_train.config.TrainConfig`` setting named without the ``attnpo_`` prefix
    (``TRAIN_SETTINGS``), with its type, default, help and constraints (the prefix keeps them apart from
    ``GRPOConfig.beta``, the KL coefficient, and ``GRPOConfig.delta``, the two-sided clip). The adapter
    also needs ``attnpo_method`` to be "attnpo" (with ``attnpo_manifest``) or a Preplan-and-Anchor method
    (with ``attnpo_rhythm``), and the group size is ``num_generations``. Grader "auto" is math-verify here: the
    prompts come from a dataset. TRL's defaults already match the method page's policy loss: PPO clip
    ``epsilon=0.2``, token-mean ``loss_type="dapo"``, no KL (``beta=0.0``), no entropy bonus; TRL has no
    dual clip, which only acts off-policy (``num_iterations > 1`` or asynchronous generation).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations_eval is not None and self.num_generations_eval < 2:
            raise SettingError("num_generations_eval", ">= 2 or null (AttnPO's group baseline needs two completions)",
                               self.num_generations_eval)
        self.to_train_config(self.num_generations)

    def to_train_config(self, group_size: int) -> TrainConfig:
        """The ``TrainConfig`` whose AttnPO settings these are (G = ``group_size``, grader "auto" resolved for a
        dataset), checked against ``TrainConfig``'s constraints and ``ADAPTER_CONSTRAINTS``.

        Raises:
            SettingError: naming the ``attnpo_`` field.
        """
        values = {name: getattr(self, PREFIX + name) for name in TRAIN_SETTINGS}
        try:
            config = TrainConfig(group_size=group_size, **values)
            check_settings(config, ADAPTER_CONSTRAINTS)
        except SettingError as err:
            raise err.renamed(PREFIX + err.name if err.name in values else err.name) from None
        return dataclasses.replace(config, grader=resolve_grader(config.grader, organism=False))


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
        config = self.args.to_train_config(self.num_generations)
        marker, grader = config.marker, config.grader
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
        """TRL's, recording the heads' attention of this rank's completions when it is the no-grad old-logps
        forward of ``_generate_and_score_completions``: the top-N heads' answer rows of the correct
        completions (AttnPO), or WAAD and FAI of every completion (the rhythm methods). A policy in training
        mode with attention dropout is not recorded; the separate eval-mode forward reads it instead."""
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
        """The current policy as a plain module in eval mode, for the no-grad KFH forward: unwrapped with
        TRL's ``unwrap_model_for_generation``, ZeRO-3 shards always gathered (per-rank forwards of different
        lengths cannot share ZeRO-3's per-layer gathering), gradient checkpointing off for the block."""
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
