"""The single-machine training loop: one step from rollouts to the PPO update, and the run around it.

Read it top to bottom. One training step (``train``):

1. draw ``prompts_per_step`` prompts (``attnpo_train.data.PromptSource``) and sample ``group_size``
   rollouts of each (``kfh_probe.sampling.generate_rollouts``: batched ``model.generate`` with left
   padding and the KV cache);
2. score them: correctness (a response that stops at ``max_new_tokens`` without EOS is incorrect), then
   the TLMRE length-penalised reward (methods "tlmre", "attnpo") or plain correctness ("rloo")
   (``attnpo_train.credit.rollout_rewards``), then the group advantages (``group_advantages``);
3. for "attnpo", rate the steps of every correct response with the top-N Key-Focus Heads of the current
   policy and rescale its advantage step by step; by default inside the update's own forward, one
   micro-batch at a time (``attnpo_train.credit.FusedStepCredit``), with ``fused_scoring: false`` in a
   separate no-grad forward before it (``attnpo_train.credit.attnpo_token_advantages``); for "preplan",
   "anchor" and "coupled", likewise read WAAD and FAI and amplify the critical tokens' advantages
   (``attnpo_train.rhythm.FusedRhythmCredit``, or ``rhythm_token_advantages`` unfused);
   other methods spread the advantage uniformly over the response (``uniform_token_advantages``);
4. one AdamW step on the token-mean PPO-clip loss, with gradient clipping and an optional KL term
   against the frozen initial policy (``accumulate_policy_gradient``, then ``optimizer.step``);
5. log a metrics line (``out/metrics.jsonl``; where the organism's labeler can read the rollouts it
   also holds their ground-truth steps per response and, for "attnpo", the precision of the credit:
   ``attnpo_train.truth``) and, every ``checkpoint_every`` steps, write a
   checkpoint atomically (``attnpo_train.checkpoint``).

The policy stays in eval mode throughout: attention capture requires it, and the models this trainer
targets (Qwen2 family) have no dropout, so gradients are the same as in train mode.

The update is on-policy (one optimiser step per batch of rollouts, as TRL's GRPO trainer with a single
iteration): the policy that sampled the rollouts is the policy being updated, so the old log-probs
are the detached current ones and the ratio is 1 at the gradient; the clipped objective then reduces
exactly to the policy-gradient surrogate. The clip statistics are logged all the same.

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
    check_resumable,
    checkpoint_root,
    deferred_interrupt,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    ResumeError,
    save_final,
)
from attnpo_train.config import RHYTHM_METHODS, TrainConfig
from attnpo_train.credit import (
    FusedStepCredit,
    UpdateCredit,
    attnpo_token_advantages,
    phrase_counts,
    rollout_rewards,
    uniform_token_advantages,
)
from attnpo_train.data import PromptSource, load_prompts
from attnpo_train.loss import ppo_clip_loss
from attnpo_train.rhythm import FusedRhythmCredit, paper_rule, rhythm_token_advantages
from attnpo_train.truth import credit_precision, mean_accounting, step_accounting
from kfh_probe import SegmenterConfig
from kfh_probe import right_pad
from kfh_probe.errors import InputError
from kfh_probe.io import atomic_write_json, atomic_write_jsonl
from kfh_probe.preplan_anchor import PreplanAnchorHeads
from kfh_probe.sampling import Rollouts, generate_rollouts

TIMING_FIELDS = ("time_rollout_s", "time_scoring_s", "time_update_s")
"""Metrics fields that measure wall-clock time (the only ones that differ between identical runs)."""


# ---------------------------------------------------------------------------------------------------
# Policy update
# ---------------------------------------------------------------------------------------------------


def _sequence_batch(rollouts: Rollouts, indices: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt+response ids [B, T], their attention mask [B, T] and the [B, T-1] response
    mask, aligned with the next-token log-probs (position t predicts token t+1)."""
    sequences = [rollouts.prompt_ids[i] + rollouts.response_ids[i] for i in indices]
    input_ids, attention_mask = right_pad(sequences, pad_id)
    mask = torch.zeros((len(indices), input_ids.shape[1] - 1), dtype=torch.float32)
    for b, i in enumerate(indices):
        first = len(rollouts.prompt_ids[i]) - 1
        mask[b, first : first + len(rollouts.response_ids[i])] = 1.0
    return input_ids, attention_mask, mask


def _advantage_batch(rollouts: Rollouts, indices: list[int], values: list[torch.Tensor], width: int) -> torch.Tensor:
    """[B, width] per-token advantages ``values[b]`` of rollout ``indices[b]``, placed as ``_sequence_batch``
    places its response mask."""
    advantages = torch.zeros((len(indices), width), dtype=torch.float32)
    for b, (i, row) in enumerate(zip(indices, values)):
        first = len(rollouts.prompt_ids[i]) - 1
        advantages[b, first : first + len(row)] = row
    return advantages


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] float32 log-probability of each next token (token t+1 given tokens 0..t)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)


def accumulate_policy_gradient(
    model: nn.Module,
    ref_model: nn.Module | None,
    rollouts: Rollouts,
    token_advantages: list[torch.Tensor] | UpdateCredit,
    config: TrainConfig,
    pad_id: int,
) -> dict[str, float]:
    """Gradient of the token-mean PPO-clip loss of all rollouts, left (clipped) in the parameters' ``.grad``.

    Micro-batches of ``config.micro_batch_size`` sequences are accumulated with the whole batch's token
    count as the denominator, so the gradient is that of the full batch's token mean. The caller applies
    it (``optimizer.step()``), so that the weight update and the run's bookkeeping happen together.

    Args:
        token_advantages: one float32 tensor [response_len_i] per rollout, or an ``UpdateCredit`` that
            computes each micro-batch's advantages from that micro-batch's own forward (fused scoring).

    Returns:
        "loss", "pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean" (token-weighted over
        the micro-batches), "kl" when a reference model is given, "grad_norm" (before clipping).
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
            with torch.no_grad():
                ref_logprobs = sequence_logprobs(ref_model, input_ids, attention_mask)
        if isinstance(token_advantages, list):
            logprobs = sequence_logprobs(model, input_ids, attention_mask)
            values = [token_advantages[i] for i in chunk]
        else:
            with token_advantages.observe(model, chunk, input_ids):
                logprobs = sequence_logprobs(model, input_ids, attention_mask)
            values = token_advantages.token_advantages(chunk)
        advantages = _advantage_batch(rollouts, chunk, values, mask.shape[1]).to(device)
        loss, stats = ppo_clip_loss(
            logprobs,
            logprobs.detach(),  # on-policy: the sampling policy is the current one (module docstring)
            advantages,
            mask,
            clip_eps=config.clip_eps,
            dual_clip=config.dual_clip,
            ref_logprobs=ref_logprobs,
            kl_coef=config.kl_coef,
            num_tokens=total_tokens,
        )
        loss.backward()
        loss_total += float(loss.detach())
        weight = float(mask.sum()) / total_tokens
        for key, value in stats.items():
            # pg_loss is already divided by the whole batch's token count; the others are chunk means.
            sums[key] = sums.get(key, 0.0) + (value if key == "pg_loss" else value * weight)
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
        heads: the top-N Key-Focus Heads as (layer, query head); empty unless the method is "attnpo".
        pad_id: id used for right padding.
        rhythm: the rhythm heads, W and FAI range of the "preplan", "anchor" and "coupled" methods.
        segmenter: how responses are cut into steps: the segmenter the manifest records
            (``kfh_probe.manifest_segmenter``); None: the default segmenter.
    """

    model: nn.Module
    tokenizer: object
    prompts: PromptSource
    heads: list[tuple[int, int]]
    pad_id: int
    rhythm: PreplanAnchorHeads | None = None
    segmenter: SegmenterConfig | None = None


def prepare_run(config: TrainConfig) -> RunInputs:
    """Load and check everything a run needs, refusing bad inputs before any training.

    ``config.model`` and (for "attnpo") ``config.manifest`` must be set; ``config.data`` None means the
    organism's task generator.

    Raises:
        DataError: rows without a prompt or a checkable answer, with their line numbers.
        kfh_probe.manifest.ManifestError: an unreadable or invalid manifest.
        kfh_probe.manifest.ManifestMismatchError: a manifest made for another model (shape always;
            weight fingerprint unless ``config.allow_finetuned``), naming the mismatch.
        kfh_probe.errors.InputError: a missing path or an impossible setting (more heads asked for than ranked).
    """
    from kfh_probe import (
        check_model_matches, load_manifest, load_model, load_tokenizer, manifest_segmenter, pad_token_id, top_heads,
    )
    from kfh_probe.loading import model_folder
    from kfh_probe.organism import task_of

    if config.model is None:
        raise InputError("no policy model: set 'model' (attnpo-train run --model DIR)")
    if config.method == "attnpo" and config.manifest is None:
        raise InputError("method 'attnpo' needs a KFH manifest: set 'manifest' (attnpo-train run --manifest M)")
    prompts = None if config.data is None else load_prompts(config.data)
    if config.credit == "oracle" and prompts is not None:
        from kfh_probe.organism.labeler import TraceFormatError, parse_prompt

        try:
            parse_prompt(prompts[0].text)
        except TraceFormatError:
            raise InputError(
                f"credit 'oracle' needs ground-truth step labels, which only the organism's task has; "
                f"{config.data} does not hold organism prompts"
            ) from None
    model_folder(config.model)  # refuses a path that is neither a model folder nor a GGUF file, before any work
    task = task_of(config.model)  # an organism folder names its task; its prompts come from that task
    source = PromptSource(prompts, task)
    manifest = load_manifest(config.manifest) if config.method == "attnpo" else None
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, "float32", config.device)
    heads: list[tuple[int, int]] = []
    segmenter = None
    if manifest is not None:
        check_model_matches(manifest, model, allow_finetuned=config.allow_finetuned)
        heads = top_heads(manifest, config.top_n_heads)
        segmenter = manifest_segmenter(manifest, Path(config.manifest).name)
    rhythm = None
    if config.method in RHYTHM_METHODS:
        from kfh_probe.organism import default_rhythm_path

        rhythm = PreplanAnchorHeads.from_file(config.rhythm or default_rhythm_path(task), model)
    return RunInputs(model, tokenizer, source, heads, pad_token_id(tokenizer), rhythm, segmenter)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def train_step(
    step: int,
    inputs: RunInputs,
    ref_model: nn.Module | None,
    data_rng: random.Random,
    config: TrainConfig,
) -> dict:
    """Everything of one training step (0-based ``step``) up to the weight update.

    Draws prompts, samples rollouts, computes rewards and advantages (AttnPO-rescaled for "attnpo")
    and leaves the clipped gradient in ``.grad``; the weights are not touched. Returns the step's
    metrics line (``"step"`` is ``step + 1``, the number of completed steps once the update is applied).
    """
    model, tokenizer = inputs.model, inputs.tokenizer
    t0 = time.perf_counter()
    prompts = inputs.prompts.draw(data_rng, config.prompts_per_step)
    rollouts = generate_rollouts(model, tokenizer, [p.text for p in prompts], config.group_size, config.max_new_tokens,
                                 config.temperature)
    correct, rewards = rollout_rewards(rollouts, prompts, config)
    advantages = group_advantages(rewards, config.estimator)
    t1 = time.perf_counter()
    prompt_texts = [prompts[i // config.group_size].text for i in range(len(rollouts.texts))]
    truth_steps = mean_accounting([step_accounting(p, r) for p, r in zip(prompt_texts, rollouts.texts)])
    rescale_stats = {"rescaled_responses": 0.0, "frac_attenuated": 0.0, "mean_gamma": 1.0}
    credit_stats: dict[str, float | None] = {}
    rhythm_stats: dict[str, float] = {}
    known_truth = prompt_texts if truth_steps is not None else None
    fused: FusedStepCredit | FusedRhythmCredit | None = None
    if config.method == "attnpo" and config.fused_scoring:
        fused = FusedStepCredit(tokenizer, rollouts, correct, advantages, inputs.heads, step, config, known_truth,
                                inputs.segmenter)
        token_advantages: list[torch.Tensor] | UpdateCredit = fused
    elif config.method == "attnpo":
        token_advantages, stats = attnpo_token_advantages(
            model, tokenizer, rollouts, correct, advantages, inputs.heads, step, config, inputs.pad_id, known_truth,
            inputs.segmenter,
        )
    elif config.method in RHYTHM_METHODS:
        rule = (config.method, config.rhythm_top, config.rhythm_gain)
        if config.fused_scoring:
            fused = FusedRhythmCredit(rollouts, advantages, inputs.rhythm, *rule, paper_rule(config))
            token_advantages = fused
        else:
            token_advantages, stats = rhythm_token_advantages(
                model, rollouts, advantages, inputs.rhythm, *rule, inputs.pad_id, config.micro_batch_size,
                paper_rule(config),
            )
            rhythm_stats = {"amplified_frac": stats["amplified_frac"]}
    else:
        token_advantages = uniform_token_advantages(advantages, rollouts)
    t2 = time.perf_counter()
    update = accumulate_policy_gradient(model, ref_model, rollouts, token_advantages, config, inputs.pad_id)
    t3 = time.perf_counter()
    in_update = 0.0 if fused is None else fused.seconds  # the fused scoring's share of the update pass
    if config.method in RHYTHM_METHODS and fused is not None:
        rhythm_stats = fused.stats()
    if config.method == "attnpo":
        stats = stats if fused is None else fused.stats()
        rescale_stats = {k: stats[k] for k in rescale_stats}
        if stats["truth"] is not None:
            credit_stats = credit_precision(stats["gammas"], advantages.reshape(-1).tolist(), stats["truth"])
    phrases = [phrase_counts(text, config.marker) for text in rollouts.texts]
    return {
        "step": step + 1,
        "reward_mean": float(rewards.mean()),
        "accuracy": float(correct.mean()),
        "response_tokens_mean": float(rollouts.response_lengths.mean()),
        "truncated_frac": 1.0 - _mean([float(f) for f in rollouts.finished]),
        "advantage_abs_mean": float(advantages.abs().mean()),
        **rescale_stats,
        **credit_stats,
        **rhythm_stats,
        **({} if truth_steps is None else {f"{k}_per_response" if k != "labelled_fraction" else k: v
                                            for k, v in truth_steps.items()}),
        "confused_per_response": _mean([c["confused"] for c in phrases]),
        "summary_per_response": _mean([c["summary"] for c in phrases]),
        **update,
        "time_rollout_s": t1 - t0,
        "time_scoring_s": t2 - t1 + in_update,
        "time_update_s": t3 - t2 - in_update,
    }


def train(inputs: RunInputs, config: TrainConfig, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train for ``config.steps`` steps, writing metrics, checkpoints and the final model under ``config.out``.

    Args:
        inputs: the checked model, tokenizer, prompts and heads (see ``RunInputs``).
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
    data_rng = random.Random(config.seed)
    metrics: list[dict] = []
    start = 0
    if resume:
        path = latest_checkpoint(out)
        if path is None:
            raise ResumeError(f"--resume: no checkpoint in {checkpoint_root(out)}")
        state, metrics, saved = load_checkpoint(path)
        check_resumable(saved, config, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], data_rng)
        start = state["step"]
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
            record = train_step(step, inputs, ref_model, data_rng, config)
            with deferred_interrupt():
                t0 = time.perf_counter()
                record["lr"] = optimizer.param_groups[0]["lr"]
                optimizer.step()
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
                save_checkpoint(out, done, model, optimizer, scheduler, rng, metrics, config)
    except KeyboardInterrupt:
        bar.close()
        if done > start:
            save_checkpoint(out, done, model, optimizer, scheduler, rng, metrics, config)
        raise
    bar.close()
    save_final(model, inputs.tokenizer, out, None if inputs.prompts.prompts is not None else inputs.prompts.task)
    return metrics
