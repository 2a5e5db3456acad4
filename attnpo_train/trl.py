"""AttnPO inside TRL: a ``GRPOTrainer`` whose advantages are the lightweight trainer's, per token.

Users who train on many GPUs keep TRL's engine (accelerate multi-process, DeepSpeed ZeRO, vLLM
generation in colocate or server mode) and swap two classes::

    from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer

    args = AttnPOConfig(output_dir="out", attnpo_manifest="manifest.json", num_generations=8)
    trainer = AttnPOGRPOTrainer(model="path/to/policy", args=args, train_dataset=dataset)  # columns: prompt, answer
    trainer.train()

What changes against ``GRPOTrainer`` (TRL 1.x), and nothing else:

- ``_generate_and_score_completions`` calls TRL's, then replaces its ``advantages`` [batch] with per-token
  advantages [batch, completion_token] from the single-machine trainer's credit strategy
  (``attnpo_train.strategies``, found by ``attnpo_method`` with one registry lookup): correctness
  (``rollout_correctness``), the strategy's rewards (TLMRE by default), ``group_advantages`` (RLOO by
  default), then the strategy's ``prepare``, its reading of the attention and its ``token_advantages``. For
  the same prompts, completions and weights the advantages are therefore the lightweight trainer's.
- Where the strategy reads the attention. When TRL runs a no-grad forward of the policy over the completions
  anyway, to compute ``old_per_token_logps`` (``gradient_accumulation_steps`` is not a multiple of
  ``steps_per_generation * num_iterations``, e.g. ``num_iterations > 1``; or vLLM with
  ``vllm_importance_sampling_correction``), the strategy observes that forward
  (``_get_per_token_logps_and_entropies``; the rewards and advantages are computed first, at that point) and
  no forward is added. Otherwise (TRL's default on-policy settings) the strategy reads it in no-grad forwards
  of its own, ``attnpo_micro_batch_size`` completions at a time, stopped after its deepest layer
  (``read_separately``). The two give the same advantages up to float rounding (TRL left-pads prompts;
  rotary attention depends on relative positions only), except under mixed precision: TRL's forward runs
  under bf16 autocast, the separate one in the weights' dtype. TRL computes the advantages before any loss
  forward and buffers them; its ``_compute_loss`` takes advantages of shape (B, T) as they are and every TRL
  loss type multiplies them elementwise with the per-token ratio.
- ``_generate`` is wrapped only to keep the unpadded prompt and completion ids it returns (whatever
  produced them: ``model.generate``, transformers continuous batching, vLLM colocate or server), so
  nothing here assumes a local HF generate.
- The reward functions: TRL's reward is the 0/1 correctness (``attnpo_correct``), kept only for TRL's
  own ``reward`` metrics; the reward that drives the advantages is logged as ``attnpo/reward``.

Distributed data: a prompt group of ``num_generations`` completions may span ranks. Every rank gathers
the ids and answers of the whole generation batch (``gather_object``), computes rewards and group
advantages of all of it and prepares the strategy with it, reads the attention of its own completions (the
expensive forward is split across ranks), gathers the readings, computes the per-token advantages of the
whole batch and keeps its slice. All ranks hold the same numbers, so the logged ``attnpo/*`` metrics are
those of the global batch.

The separate forward runs on the model unwrapped from accelerate/DeepSpeed through TRL's
``unwrap_model_for_generation`` (which gathers ZeRO-3 shards into full weights on each rank, as TRL's
own generation does by default) in eval mode; the training mode and gradient checkpointing are
restored afterwards. A PEFT policy is scored with its adapters active.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from kfh_probe import InputError, ManifestMismatchError, Rollouts, attention_modules, decode_responses, pad_token_id

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
            The credit strategy, any name registered in `attnpo_train.strategies`: `"attnpo"` (Key-Focus-Head step
            rescaling), `"tlmre"` or `"rloo"` (outcome advantage on every token), or a Preplan-and-Anchor strategy,
            `"preplan"`, `"anchor"` or `"coupled"` (docs/method.md): the same TLMRE reward, with the advantage of
            the top `attnpo_rhythm_top` share of tokens by the signal multiplied by `attnpo_rhythm_gain` where it
            is non-negative.
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
        default="attnpo", metadata={"help": "The credit strategy: 'attnpo', 'tlmre', 'rloo', 'preplan', 'anchor', "
                                    "'coupled', or any other registered name."}
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
        self.to_train_config(self.num_generations)  # the method's name and the range checks of the lightweight trainer
        for need in strategy_class(self.attnpo_method).files:
            if getattr(self, PREFIX + need.setting) is None:
                raise InputError(f"attnpo_method {self.attnpo_method!r} needs '{PREFIX}{need.setting}', the "
                                 f"{need.what} of the policy's base model")
        if self.num_generations_eval is not None and self.num_generations_eval < 2:
            raise InputError(
                f"AttnPO's group baseline needs num_generations_eval >= 2 (or None); got {self.num_generations_eval}"
            )

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
        """The current policy as a plain module in eval mode, for the strategy's no-grad forwards.

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
