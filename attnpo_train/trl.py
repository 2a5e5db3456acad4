"""AttnPO inside TRL: a ``GRPOTrainer`` whose advantages are the single-machine trainer's, per token.

Users who train on many GPUs keep TRL's engine (accelerate multi-process, DeepSpeed ZeRO, vLLM
generation in colocate or server mode) and swap two classes::

    from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer

    args = AttnPOConfig(output_dir="out", attnpo_manifest="manifest.json", num_generations=8)
    trainer = AttnPOGRPOTrainer(model="path/to/policy", args=args, train_dataset=dataset)  # columns: prompt, answer
    trainer.train()

What the subclass changes, and nothing else:

- ``_generate_and_score_completions`` calls TRL's, then replaces its sequence advantages ``[completion]``
  with per-token advantages ``[completion, completion_token]`` from the single-machine trainer's credit
  strategy (``attnpo_train.strategies``, one registry lookup by ``attnpo_method``): correctness, the
  strategy's rewards (TLMRE by default), the group advantages, then the strategy's ``prepare``, its reading
  of the attention and its ``token_advantages``. The same completions and weights give the single-machine
  trainer's advantages.
- The strategy reads the attention during TRL's no-grad old-logps forward when TRL runs one
  (``old_logps_forward``), else in no-grad forwards of its own (``read_separately``), stopped after its
  deepest layer. Both give the same advantages up to float rounding, except under mixed precision, where
  TRL's forward runs under autocast (``docs/trl/README.md`` has the table).
- ``_generate`` is wrapped only to keep the unpadded prompt and completion ids it returns, whatever
  produced them (HF generate, continuous batching, vLLM).
- TRL's reward is the 0/1 correctness (``attnpo_correct``), kept for TRL's own ``reward`` metrics; the
  reward that drives the advantages is logged as ``attnpo/reward``.

Distributed data: a prompt group of ``num_generations`` completions may span ranks. Every rank gathers
the ids and answers of the whole generation batch, computes rewards and group advantages of all of it
and prepares the strategy with it, reads the attention of its own completions (the expensive forward is split across ranks), gathers the
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
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from attnpo_train.advantages import group_advantages
from attnpo_train.config import TrainConfig
from attnpo_train.rewards import correctness, rollout_correctness
from attnpo_train.strategies import CreditBatch, read_separately, strategy_class
from kfh_probe import (
    InputError, ManifestMismatchError, Relation, Rollouts, SettingError, attention_modules, check_settings,
    decode_responses, help_of, pad_token_id, resolve_grader,
)

ANSWER_COLUMN = "answer"
"""Dataset column with each prompt's reference final answer."""
PREFIX = "attnpo_"
"""Every AttnPO field of ``AttnPOConfig`` is a ``TrainConfig`` field with this prefix."""
TRAIN_SETTINGS = (
    "method", "manifest", "rhythm", "rhythm_top", "rhythm_gain", "rhythm_rule", "rhythm_alpha", "rhythm_k",
    "top_n_heads", "estimator", "alpha_len", "alpha", "baseline", "beta", "delta", "horizon", "pos_attenuation",
    "neg_attenuation", "use_difficulty", "marker", "grader", "allow_finetuned", "micro_batch_size",
)
"""The ``TrainConfig`` settings the adapter reads, each an ``attnpo_<name>`` field of ``AttnPOConfig``. TRL's
own fields stand for the others: ``num_generations`` is the group size, ``learning_rate``, ``max_steps``,
``temperature``, ``max_completion_length``, ``epsilon`` (the clip) and ``beta`` (the KL coefficient); for
precision and memory ``bf16`` / ``fp16`` (TRL's mixed precision: autocast, float32 master weights, fp16 loss
scaling) stand for ``dtype``, the dtype the policy is loaded in (``model_init_kwargs``) for ``weights_dtype``,
and ``gradient_checkpointing`` for ``gradient_checkpointing`` (the strategy reads attention in no-grad forwards,
which are never checkpointed, so it sees every call once)."""
ADAPTER_CONSTRAINTS = {
    name: (Relation(lambda path, config, name=name: path is not None or not _reads(config.method, name),
                    f"given when attnpo_method's strategy reads it (the {what} of the policy's base model)"),)
    for name, what in (("manifest", "KFH manifest"), ("rhythm", "kfh-probe rhythm file"))
}
"""What the adapter asks of those settings beyond ``TrainConfig``'s constraints: every file the strategy
reads named (the organism's default files are the single-machine trainer's)."""


def _reads(method: str, setting: str) -> bool:
    """Whether ``method``'s strategy reads the file named by ``setting`` (``CreditStrategy.files``)."""
    return any(need.setting == setting for need in strategy_class(method).files)


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
    also needs every file of ``attnpo_method``'s strategy named (``attnpo_manifest`` for "attnpo",
    ``attnpo_rhythm`` for a Preplan-and-Anchor method), and the group size is ``num_generations``. Grader "auto" is math-verify here: the
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
        kfh_probe.ManifestMismatchError: a manifest made for another model.
        kfh_probe.capture.UnsupportedModelError: an architecture whose attention cannot be captured.
        kfh_probe.InputError: a dataset without an ``answer`` column, more heads asked for than ranked, a rhythm
            file of another model.
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
        config = args.to_train_config(args.num_generations)
        self._attnpo_strategy = strategy_class(config.method)(config)  # refuses a bad file before loading weights
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
                "AttnPOGRPOTrainer does not support FSDP yet (the per-rank attention forward would need FSDP's "
                "collective parameter gathering in lockstep); use DeepSpeed ZeRO-2 or ZeRO-3"
            )
        policy = _base_model(self.accelerator.unwrap_model(self.model))
        attention_modules(policy)  # UnsupportedModelError, by name, for attention the probe cannot capture
        try:
            self._attnpo_strategy.attach(policy, self._tokenizer, gather_params=self._dist.gather_params)
        except ManifestMismatchError as err:
            raise ManifestMismatchError(f"{err} (AttnPOConfig: attnpo_allow_finetuned=True)") from None
        self._attnpo_pad_id = pad_token_id(self._tokenizer)
        self._attnpo_generated: tuple[list[list[int]], list[list[int]]] | None = None
        self._attnpo_answers: list[Any] | None = None  # this rank's answers while a batch is generated and scored
        self._attnpo_rows: range | None = None  # this rank's rows of the prepared global batch
        self._attnpo_rewards: torch.Tensor | None = None  # [P, G] rewards of the prepared global batch
        self._attnpo_observed = False  # whether the strategy watched TRL's old-logps forward of the batch

    def attnpo_correct(self, completion_ids: list[list[int]], answer: list[Any], **_: Any) -> list[float]:
        """TRL reward function: 1.0 when a completion ended with EOS and its boxed answer after the marker
        matches the reference (``attnpo_train.rewards.correctness``), else 0.0. Feeds only TRL's own
        ``reward`` metrics; the advantages come from the credit strategy."""
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
        then the strategy reads the attention off it, else it takes forwards of its own."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's, watched by the credit strategy when it is the no-grad ``old_per_token_logps`` forward of
        ``_generate_and_score_completions`` (the first no-grad call on the policy there, made only when
        ``old_logps_forward()``, on every rank alike). The batch is prepared first (``attnpo_prepare``,
        collective). Not watched: a strategy that reads no attention, and a policy in training mode with
        attention dropout (the strategy then takes its own eval-mode forwards)."""
        policy = _base_model(self.accelerator.unwrap_model(self.model))
        dropout = self.model.training and getattr(policy.config, "attention_dropout", 0.0)
        if (not self._attnpo_strategy.layers or self._attnpo_answers is None or self._attnpo_generated is None
                or self._attnpo_observed or torch.is_grad_enabled() or model is not self.model
                or not self.old_logps_forward() or dropout):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        rows = self.attnpo_prepare()
        width = input_ids.shape[1] - logits_to_keep  # prompts are left-padded to this width
        offsets = [width - len(ids) for ids in self._attnpo_generated[0]]
        with self._attnpo_strategy.observe(policy, list(rows), input_ids, offsets):
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                *args, **kwargs)
        self._attnpo_observed = True
        return result

    def attnpo_prepare(self) -> range:
        """Rewards and group advantages of the whole generation batch, and the strategy prepared with them,
        once per batch (collective: every rank must call it); returns this rank's rows of the global batch.

        The global batch is the ranks' rows in rank order, each prompt's G completions consecutive (G is
        ``num_generations``, or ``num_generations_eval`` in evaluation)."""
        if self._attnpo_rows is not None:
            return self._attnpo_rows
        prompt_ids, completion_ids = self._attnpo_generated
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        all_prompt_ids = gather_object(prompt_ids)
        all_completion_ids = gather_object(completion_ids)
        all_answers = gather_object([str(a) for a in self._attnpo_answers])
        if len(all_completion_ids) % group_size:
            raise RuntimeError(f"{len(all_completion_ids)} completions do not form groups of {group_size}")
        rollouts = Rollouts(group_size, all_prompt_ids,
                            *decode_responses(self._tokenizer, all_completion_ids, set(self.eos_token_ids)))
        strategy = self._attnpo_strategy
        correct = rollout_correctness(rollouts, all_answers[::group_size], strategy.config)
        self._attnpo_rewards = strategy.rewards(correct, rollouts)
        advantages = group_advantages(self._attnpo_rewards, strategy.config.estimator)
        strategy.prepare(CreditBatch(rollouts, correct, advantages, self.state.global_step))
        start = self.accelerator.process_index * len(completion_ids)
        self._attnpo_rows = range(start, start + len(completion_ids))
        return self._attnpo_rows

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation and scoring, then ``advantages`` [batch] -> per-token advantages [batch, completion_token]."""
        self._attnpo_generated = None
        self._attnpo_answers = [row[ANSWER_COLUMN] for row in inputs]
        self._attnpo_rows = None
        self._attnpo_observed = False
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._attnpo_generated is None:
                raise RuntimeError("TRL's _generate_and_score_completions did not call _generate; unsupported TRL version")
            if not len(self._attnpo_generated[0]) == len(self._attnpo_generated[1]) == len(inputs):
                raise RuntimeError(
                    f"expected one completion per input row; got {len(inputs)} rows, {len(self._attnpo_generated[0])} "
                    f"prompts, {len(self._attnpo_generated[1])} completions (tools and rollout functions are not supported)"
                )
            token_advantages, metrics = self.attnpo_advantages()
        finally:
            self._attnpo_answers = None
            self._attnpo_generated = None
        mode = "train" if self.model.training else "eval"
        width = output["completion_ids"].shape[1]
        advantages = torch.zeros((len(token_advantages), width), dtype=torch.float32)
        for b, values in enumerate(token_advantages):
            advantages[b, : len(values)] = values
        output["advantages"] = advantages.to(output["completion_ids"].device)
        for name, value in metrics.items():
            self._metrics[mode][f"attnpo/{name}"].append(value)
        sequence_advantages = self._attnpo_strategy.batch.advantages.reshape(-1).tolist()
        logged = self._logs["advantages"]  # the completions table shows the advantages that are used
        for _ in range(min(len(sequence_advantages), len(logged))):
            logged.pop()
        logged.extend(sequence_advantages)
        return output

    def attnpo_advantages(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The credit strategy's per-token advantages of this rank's completions; every rank must call it
        (collective). Each rank reads the attention of its own completions (off TRL's old-logps forward, or in
        forwards of its own), the readings are gathered, and every rank hands out the whole batch's advantages.

        Returns:
            (this rank's B float32 tensors [completion_len_b], metrics of the whole batch: "reward", "accuracy",
             "advantage_abs_mean", then the strategy's ``metrics``).
        """
        strategy = self._attnpo_strategy
        rows = self.attnpo_prepare()
        if strategy.layers and not self._attnpo_observed:
            with self._scoring_model() as model:
                read_separately(strategy, model, self._attnpo_pad_id, strategy.config.micro_batch_size, rows)
        strategy.readings.update(gather_object([(i, strategy.readings[i]) for i in rows if i in strategy.readings]))
        batch = strategy.batch
        token_advantages = strategy.token_advantages(list(range(len(batch.rollouts.response_ids))))
        metrics = {
            "reward": float(self._attnpo_rewards.mean()),
            "accuracy": float(batch.correct.mean()),
            "advantage_abs_mean": float(batch.advantages.abs().mean()),
            **strategy.metrics(),
        }
        return token_advantages[rows.start : rows.stop], metrics

    @contextlib.contextmanager
    def _scoring_model(self) -> Iterator[nn.Module]:
        """The current policy as a plain module in eval mode, for the strategy's no-grad forwards: unwrapped with
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
