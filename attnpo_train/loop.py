"""The single-machine training loop: one step from rollouts to the policy update, and the run around it.

Read it top to bottom. One training step (``train``):

1. draw ``prompts_per_step`` prompts (``attnpo_train.data.PromptSource``) and sample ``group_size``
   rollouts of each (``kfh_probe.generate_rollouts``: batched ``model.generate`` with left padding and the
   KV cache);
2. score them: correctness (a response that stops at ``max_new_tokens`` without EOS is incorrect,
   ``attnpo_train.rewards.rollout_correctness``), the method's rewards (``CreditStrategy.rewards``: TLMRE's
   length-penalised reward, or the correctness itself for "rloo"), then the group advantages
   (``group_advantages``);
3. hand them to the method's credit strategy (``attnpo_train.strategies``, found by name once per run), which
   reads the attention it needs inside the update's own forward, one micro-batch at a time, and hands out
   that micro-batch's per-token advantages (with ``fused_scoring: false`` it reads it in separate no-grad
   forwards before the update instead, ``read_separately``);
4. one AdamW step on the token-mean policy-gradient loss, with gradient clipping and an optional KL term
   against the frozen initial policy (``accumulate_policy_gradient``, then ``optimizer.step``);
5. log a metrics line (``out/metrics.jsonl``: the rewards, the strategy's ``metrics``, the diagnostics hook's
   phrase counts and, where the organism's labeler can read the rollouts, their ground-truth steps per
   response and where the credit fell, ``attnpo_train.diagnostics`` and ``GroundTruth.credit_metrics``) and,
   every ``checkpoint_every`` steps, write a checkpoint atomically (``attnpo_train.checkpoint``).

The policy stays in eval mode throughout: attention capture requires it, and the models this trainer
targets (Qwen2 family) have no dropout, so gradients are the same as in train mode. With
``gradient_checkpointing`` the update's forward runs in training mode (transformers checkpoints only there;
policies with dropout are refused). With ``dtype`` bfloat16 or float16 the rollouts and the update's forward
run under autocast (mixed precision, ``attnpo_train.precision``).

The update is on-policy, one optimiser step per batch of rollouts as in the reference
(``attnpo_train.loss``): the policy that sampled the rollouts is the policy being updated.

A run interrupted with Ctrl-C saves a checkpoint of the last completed step and raises
KeyboardInterrupt; ``train(..., resume=True)`` continues from the newest checkpoint and logs, on a CPU,
exactly the metrics an uninterrupted run logs (timing fields aside): model, optimiser, scheduler,
every random generator and the metrics so far are restored (``attnpo_train.checkpoint``).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attnpo_train.advantages import group_advantages
from attnpo_train.checkpoint import (
    capture_rng,
    deferred_interrupt,
    resume_from,
    save_checkpoint,
    save_final,
)
from attnpo_train.config import TrainConfig
from attnpo_train.data import Prompt, PromptSource, load_prompts
from attnpo_train.diagnostics import Diagnostics
from attnpo_train.loss import policy_gradient_loss
from attnpo_train.precision import LossScaler, autocast, enable_checkpointing, update_forward
from attnpo_train.rewards import rollout_correctness
from attnpo_train.strategies import CreditBatch, CreditStrategy, read_separately, strategy_class
from kfh_probe import (
    InputError, Rollouts, TraceFormatError, atomic_write_json, atomic_write_jsonl, generate_rollouts, parse_prompt,
    right_pad,
)

TIMING_FIELDS = ("time_rollout_s", "time_scoring_s", "time_update_s")
"""Metrics fields that measure wall-clock time (the only ones that differ between identical runs)."""


# ---------------------------------------------------------------------------------------------------
# Policy update
# ---------------------------------------------------------------------------------------------------


def _sequence_batch(rollouts: Rollouts, indices: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt+response ids [batch, position], their attention mask [batch, position] and the
    [batch, position - 1] response mask, aligned with the next-token log-probs (position t predicts t+1)."""
    sequences = [rollouts.prompt_ids[i] + rollouts.response_ids[i] for i in indices]
    input_ids, attention_mask = right_pad(sequences, pad_id)
    mask = torch.zeros((len(indices), input_ids.shape[1] - 1), dtype=torch.float32)
    for b, i in enumerate(indices):
        first = len(rollouts.prompt_ids[i]) - 1
        mask[b, first : first + len(rollouts.response_ids[i])] = 1.0
    return input_ids, attention_mask, mask


def _advantage_batch(rollouts: Rollouts, indices: list[int], values: list[torch.Tensor], width: int) -> torch.Tensor:
    """[batch, width] per-token advantages ``values[b]`` of rollout ``indices[b]``, placed as ``_sequence_batch``
    places its response mask."""
    advantages = torch.zeros((len(indices), width), dtype=torch.float32)
    for b, (i, row) in enumerate(zip(indices, values)):
        first = len(rollouts.prompt_ids[i]) - 1
        advantages[b, first : first + len(row)] = row
    return advantages


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, position - 1] float32 log-probability of each next token (token t+1 given tokens 0..t)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)


def accumulate_policy_gradient(
    model: nn.Module,
    ref_model: nn.Module | None,
    rollouts: Rollouts,
    strategy: CreditStrategy,
    config: TrainConfig,
    pad_id: int,
    scaler: LossScaler | None = None,
) -> dict[str, float]:
    """Gradient of the token-mean policy-gradient loss of all rollouts, left (clipped) in the parameters' ``.grad``.

    Micro-batches of ``config.micro_batch_size`` sequences are accumulated with the whole batch's token
    count as the denominator, so the gradient is that of the full batch's token mean. Each micro-batch's
    per-token advantages come from ``strategy`` (prepared with these rollouts), which may read them off that
    micro-batch's own forward (``CreditStrategy.observe``). The forwards run in ``config.dtype`` (autocast) and,
    with ``config.gradient_checkpointing``, in training mode (``attnpo_train.precision.update_forward``); the
    observe block closes before ``backward``, so a checkpointed layer's recomputation is not observed. With a
    float16 ``scaler`` the loss is scaled for ``backward`` and the gradient unscaled before clipping. The caller
    applies the gradient (``optimizer.step()``, or ``scaler.step()``), so that the weight update and the run's
    bookkeeping happen together.

    Returns:
        "loss", "pg_loss", "kl" when a reference model is given (token-weighted over the micro-batches),
        "grad_norm" (before clipping).
    """
    device = next(model.parameters()).device
    total_tokens = float(sum(len(r) for r in rollouts.response_ids))
    for param in model.parameters():
        param.grad = None
    sums: dict[str, float] = {}
    loss_total = 0.0
    indices = list(range(len(rollouts.response_ids)))
    for start in range(0, len(indices), config.micro_batch_size):
        chunk = indices[start : start + config.micro_batch_size]
        input_ids, attention_mask, mask = (t.to(device) for t in _sequence_batch(rollouts, chunk, pad_id))
        ref_logprobs = None
        if ref_model is not None:
            with torch.no_grad(), autocast(config, device):
                ref_logprobs = sequence_logprobs(ref_model, input_ids, attention_mask)
        with strategy.observe(model, chunk, input_ids), update_forward(model, config):
            logprobs = sequence_logprobs(model, input_ids, attention_mask)
        values = strategy.token_advantages(chunk)
        advantages = _advantage_batch(rollouts, chunk, values, mask.shape[1]).to(device)
        loss, stats = policy_gradient_loss(
            logprobs, advantages, mask, ref_logprobs=ref_logprobs, kl_coef=config.kl_coef, num_tokens=total_tokens,
        )
        if scaler is None:
            loss.backward()
        else:
            scaler.backward(loss)
        loss_total += float(loss.detach())
        weight = float(mask.sum()) / total_tokens
        for key, value in stats.items():
            # pg_loss is already divided by the whole batch's token count; the others are chunk means.
            sums[key] = sums.get(key, 0.0) + (value if key == "pg_loss" else value * weight)
    if scaler is not None:
        scaler.unscale()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    return {"loss": loss_total, **sums, "grad_norm": float(grad_norm)}


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a linear warm-up to ``lr`` over ``warmup_steps`` steps, constant afterwards."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: min(1.0, (done + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What ``train`` needs besides the config, all checked before any training.

    Attributes:
        model: the policy (any Hugging Face causal LM), on its device, in eval mode.
        tokenizer: its fast tokenizer.
        prompts: where prompts come from.
        strategy: the method's credit strategy, attached to ``model``.
        pad_id: id used for right padding.
        diagnostics: the hook that logs phrase counts and the organism's ground truth (None: neither).
    """

    model: nn.Module
    tokenizer: object
    prompts: PromptSource
    strategy: CreditStrategy
    pad_id: int
    diagnostics: Diagnostics | None = None


def organism_prompts(prompts: list[Prompt] | None) -> bool:
    """Whether the organism's labeler can read the task: its generator (None) or a file with its prompts."""
    if prompts is None:
        return True
    for prompt in prompts:
        try:
            parse_prompt(prompt.text)
            return True
        except TraceFormatError:
            pass
    return False


def prepare_run(config: TrainConfig) -> RunInputs:
    """Load and check everything a run needs, refusing bad inputs before any training.

    ``config.model`` must be set; ``config.data`` None means the organism's task generator; a strategy's file
    (``CreditStrategy.files``: the manifest, the rhythm file) left None is the organism's.

    Raises:
        DataError: rows without a prompt or a checkable answer, with their line numbers.
        kfh_probe.manifest.ManifestError: an unreadable or invalid manifest.
        kfh_probe.ManifestMismatchError: a manifest made for another model (shape always; weight fingerprint
            unless ``config.allow_finetuned``), naming the mismatch.
        kfh_probe.InputError: a missing path or an impossible setting (more heads asked for than ranked, an
            "oracle" control without ground truth, a rhythm file of another model).
    """
    from kfh_probe import load_model, load_tokenizer, model_folder, pad_token_id, task_of

    if config.model is None:
        raise InputError("no policy model: set 'model' (attnpo-train run --model DIR)")
    prompts = None if config.data is None else load_prompts(config.data)
    ground_truth = organism_prompts(prompts)
    model_folder(config.model)  # refuses a path that is neither a model folder nor a GGUF file, before any work
    task = task_of(config.model)  # an organism folder names its task; its prompts come from that task
    strategy = strategy_class(config.method)(config, ground_truth)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, config.weights_dtype, config.device)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    strategy.attach(model, tokenizer)
    diagnostics = Diagnostics(config.marker, ground_truth)
    return RunInputs(model, tokenizer, PromptSource(prompts, task), strategy, pad_token_id(tokenizer), diagnostics)


def train_step(
    step: int,
    inputs: RunInputs,
    ref_model: nn.Module | None,
    data_rng: random.Random,
    config: TrainConfig,
    scaler: LossScaler | None = None,
) -> dict:
    """Everything of one training step (0-based ``step``) up to the weight update.

    Draws prompts, samples rollouts (under autocast in ``config.dtype``), computes rewards and group advantages,
    hands them to the credit strategy and leaves the clipped gradient in ``.grad`` (``scaler``: float16's loss
    scaling); the weights are not touched. Returns the step's metrics line (``"step"`` is ``step + 1``, the
    number of completed steps once the update is applied; ``"loss_scale"`` where the loss is scaled).
    """
    model, strategy, diagnostics = inputs.model, inputs.strategy, inputs.diagnostics
    t0 = time.perf_counter()
    prompts = inputs.prompts.draw(data_rng, config.prompts_per_step)
    with autocast(config, next(model.parameters()).device):
        rollouts = generate_rollouts(model, inputs.tokenizer, [p.text for p in prompts], config.group_size,
                                     config.max_new_tokens, config.temperature)
    correct = rollout_correctness(rollouts, [p.answer for p in prompts], config)
    rewards = strategy.rewards(correct, rollouts)
    advantages = group_advantages(rewards, config.estimator)
    t1 = time.perf_counter()
    prompt_texts = [prompts[i // config.group_size].text for i in range(len(rollouts.texts))]
    truth = None if diagnostics is None else diagnostics.truth(prompt_texts, rollouts)
    strategy.prepare(CreditBatch(rollouts, correct, advantages, step, truth))
    if not config.fused_scoring:
        read_separately(strategy, model, inputs.pad_id, config.micro_batch_size)
    t2 = time.perf_counter()
    update = accumulate_policy_gradient(model, ref_model, rollouts, strategy, config, inputs.pad_id, scaler)
    t3 = time.perf_counter()
    in_update = strategy.seconds  # the strategy's share of the update pass
    return {
        "step": step + 1,
        "reward_mean": float(rewards.mean()),
        "accuracy": float(correct.mean()),
        "response_tokens_mean": float(rollouts.response_lengths.mean()),
        "truncated_frac": 1.0 - sum(map(float, rollouts.finished)) / len(rollouts.finished),
        "advantage_abs_mean": float(advantages.abs().mean()),
        **strategy.metrics(),
        **({} if diagnostics is None else diagnostics.metrics(rollouts, truth)),
        **({} if truth is None else truth.credit_metrics(inputs.tokenizer, rollouts, advantages, strategy.handed_out)),
        **update,
        **({"loss_scale": scaler.scaler.get_scale()} if scaler is not None and scaler.enabled else {}),
        "time_rollout_s": t1 - t0,
        "time_scoring_s": t2 - t1 + in_update,
        "time_update_s": t3 - t2 - in_update,
    }


def train(inputs: RunInputs, config: TrainConfig, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train for ``config.steps`` steps, writing metrics, checkpoints and the final model under ``config.out``.

    Args:
        inputs: the checked model, tokenizer, prompts and credit strategy (see ``RunInputs``).
        resume: continue from the newest checkpoint in ``out/checkpoints`` (ResumeError when there is
            none or its settings differ beyond ``RESUMABLE_CHANGES``).
        progress: show a tqdm bar with live reward, accuracy and response tokens.
    Returns:
        every metrics line of the run (resumed lines included).
    Raises:
        KeyboardInterrupt: after saving a checkpoint of the last completed step.
    """
    from tqdm.auto import tqdm

    out = Path(config.out)
    model = inputs.model.eval()
    ref_model = None
    if config.kl_coef > 0:  # the frozen initial policy; built before any checkpoint is loaded
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer, scheduler = make_optimizer(model, config)
    scaler = LossScaler(optimizer, config, next(model.parameters()).device)
    data_rng = random.Random(config.seed)
    metrics: list[dict] = []
    start = 0
    if resume:
        start, metrics, _ = resume_from(out, config, model, optimizer, scheduler, data_rng, scaler.scaler)
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", dataclasses.asdict(config))
    atomic_write_jsonl(out / "metrics.jsonl", metrics)

    # The model, optimiser, scheduler, `rng` and `metrics` always describe the state after `done`
    # completed steps: the weight update and the bookkeeping happen in one block that Ctrl-C cannot split.
    rng = capture_rng(data_rng)
    done = start
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc=config.method, unit="step")
    try:
        for step in range(start, config.steps):
            record = train_step(step, inputs, ref_model, data_rng, config, scaler)
            with deferred_interrupt():
                t0 = time.perf_counter()
                record["lr"] = optimizer.param_groups[0]["lr"]
                scaler.step()
                scheduler.step()
                record["time_update_s"] += time.perf_counter() - t0
                metrics.append(record)
                done = step + 1
                rng = capture_rng(data_rng)
            for param in model.parameters():
                param.grad = None
            atomic_write_jsonl(out / "metrics.jsonl", metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{record['reward_mean']:.3f}",
                acc=f"{record['accuracy']:.2f}",
                tokens=f"{record['response_tokens_mean']:.0f}",
            )
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(out, done, model, optimizer, scheduler, rng, metrics, config, scaler.scaler)
    except KeyboardInterrupt:
        bar.close()
        if done > start:
            save_checkpoint(out, done, model, optimizer, scheduler, rng, metrics, config, scaler.scaler)
        raise
    bar.close()
    save_final(model, inputs.tokenizer, out, inputs.prompts.organism_task)
    return metrics
