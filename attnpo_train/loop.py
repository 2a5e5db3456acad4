"""The single-machine training loop: rollouts, rewards, AttnPO credit assignment, PPO update, checkpoints.

Read it top to bottom. One training step (``train``):

1. draw ``prompts_per_step`` prompts and sample ``group_size`` rollouts of each (``generate_rollouts``:
   batched ``model.generate`` with left padding and the KV cache);
2. score them: correctness (a response that stops at ``max_new_tokens`` without EOS is incorrect), then
   the TLMRE length-penalised reward (methods "tlmre", "attnpo") or plain correctness ("grpo")
   (``rollout_rewards``), then the group advantages (``group_advantages``);
3. for "attnpo", rate the steps of every correct response with the top-N Key-Focus Heads of the current
   policy and rescale its advantage step by step (``attnpo_token_advantages``); other methods spread
   the advantage uniformly over the response (``uniform_token_advantages``);
4. one AdamW step on the token-mean PPO-clip loss, with gradient clipping and an optional KL term
   against the frozen initial policy (``accumulate_policy_gradient``, then ``optimizer.step``);
5. log a metrics line (``out/metrics.jsonl``) and, every ``checkpoint_every`` steps, write a
   checkpoint atomically.

The policy stays in eval mode throughout: attention capture requires it, and the models this trainer
targets (Qwen2 family) have no dropout, so gradients are the same as in train mode.

The update is on-policy (one optimiser step per batch of rollouts, as TRL's GRPO trainer with a single
iteration): the policy that sampled the rollouts is the policy being updated, so the old log-probs
are the detached current ones and the ratio is 1 at the gradient; the clipped objective then reduces
exactly to the policy-gradient surrogate. The clip statistics are logged all the same.

A run interrupted with Ctrl-C saves a checkpoint of the last completed step and raises
KeyboardInterrupt; ``train(..., resume=True)`` continues from the newest checkpoint and logs, on a CPU,
exactly the metrics an uninterrupted run logs (timing fields aside): model, optimiser, scheduler,
every random generator and the metrics so far are restored.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attnpo_train.advantages import group_accuracy, group_advantages, rescale_group
from attnpo_train.config import TrainConfig
from attnpo_train.loss import ppo_clip_loss
from attnpo_train.rewards import correctness, length_penalised_rewards
from kfh_probe.alignment import TokenizedTrace, align_generated, collate
from kfh_probe.capture import capture_answer_attention
from kfh_probe.io import atomic_write_json, atomic_write_jsonl
from kfh_probe.scoring import step_scores
from kfh_probe.segmentation import SegmenterConfig

TIMING_FIELDS = ("time_rollout_s", "time_scoring_s", "time_update_s")
"""Metrics fields that measure wall-clock time (the only ones that differ between identical runs)."""
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device", "out")
"""Config fields a resumed run may change; any other difference is refused."""
KEEP_CHECKPOINTS = 2
"""Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
_CHECKPOINT_DIR = re.compile(r"^step-(\d{8})$")


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A prompt file with rows that cannot be trained or evaluated on (each row named by line)."""


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt: exact model input text and its reference answer."""

    id: str
    text: str
    answer: str


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL file of ``{"prompt": str, "answer": str or number, "id": optional}`` rows.

    Blank lines are skipped. Every row without a checkable answer (missing, empty, not a string or a
    number) or without a non-empty string prompt is collected, and all of them are reported at once.

    Raises:
        DataError: naming the file and each bad row by line number (and id when it has one).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    prompts: list[Prompt] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        where = f"line {number}" + (f" (id {row['id']!r})" if "id" in row else "")
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not prompt:
            problems.append(f"{where}: 'prompt' is missing or not a non-empty string")
            continue
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            problems.append(f"{where}: no checkable answer ('answer' is missing or not a string or number)")
            continue
        if not str(answer).strip():
            problems.append(f"{where}: no checkable answer ('answer' is empty)")
            continue
        prompts.append(Prompt(str(row.get("id", f"line-{number}")), prompt, str(answer).strip()))
    if problems:
        raise DataError(f"{path}: {len(problems)} row(s) cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


class PromptSource:
    """Where a run's prompts come from: a fixed list (sampled without replacement within a step) or,
    when ``prompts`` is None, fresh problems from the embedded organism's task generator."""

    def __init__(self, prompts: list[Prompt] | None) -> None:
        self.prompts = prompts

    def draw(self, rng: random.Random, k: int) -> list[Prompt]:
        """``k`` prompts, a pure function of ``rng``'s state (which it advances)."""
        if self.prompts is None:
            from kfh_probe.organism.task import generate_problem

            problems = [generate_problem(rng) for _ in range(k)]
            return [Prompt(f"organism-{i}", p.prompt(), str(p.answer)) for i, p in enumerate(problems)]
        if k <= len(self.prompts):
            return rng.sample(self.prompts, k)
        return [rng.choice(self.prompts) for _ in range(k)]


# ---------------------------------------------------------------------------------------------------
# Rollouts and rewards
# ---------------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """The responses of one step; rollout ``i`` answers prompt ``i // group_size``.

    Attributes:
        group_size: G.
        prompt_ids: P*G lists, the prompt's token ids (no padding).
        response_ids: P*G lists, generated ids up to and including the first EOS (all generated ids
            when the response was cut at ``max_new_tokens``).
        texts: P*G decoded responses (special tokens kept so the marker survives, EOS text removed).
        finished: P*G flags, True when the response ended with EOS.
    """

    group_size: int
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]

    @property
    def response_lengths(self) -> torch.Tensor:
        """[P*G] float32 response lengths in tokens (EOS included)."""
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)


@torch.no_grad()
def generate_rollouts(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    group_size: int,
    max_new_tokens: int,
    temperature: float | None,
    batch_size: int | None = None,
) -> Rollouts:
    """Sample ``group_size`` responses to each prompt (greedy when ``temperature`` is None).

    Prompts are tokenised as they are (no special tokens added: the prompt text already holds any chat
    template), repeated G times, left-padded and generated in batches of ``batch_size`` sequences (all
    at once when None) with the KV cache. Sampling draws from torch's global generator, so a run is
    reproducible from ``torch.get_rng_state()``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses could never finish")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    encoded = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [list(ids) for ids in encoded for _ in range(group_size)]
    sampling = (
        {"do_sample": False}
        if temperature is None
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    batch_size = batch_size or len(rows)
    responses: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, ids in enumerate(chunk):
            input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
        )
        responses += out[:, width:].tolist()
    trimmed, texts, finished = decode_responses(tokenizer, responses, {eos})
    return Rollouts(group_size, rows, trimmed, texts, finished)


def decode_responses(
    tokenizer, generated: list[list[int]], eos_ids: Collection[int]
) -> tuple[list[list[int]], list[str], list[bool]]:
    """Trim generated ids at the first end-of-sequence id and decode them, as ``Rollouts`` holds them.

    Args:
        generated: one list of generated ids per response (padding after EOS allowed).
        eos_ids: the ids that end a response (the tokenizer's EOS; an engine may add the generation
            config's other end ids).
    Returns:
        (ids up to and including the first id in ``eos_ids``, all ids when there is none;
         texts decoded with special tokens kept, so the marker survives, and the EOS text removed;
         finished flags, True when the response ended with an EOS id).
    """
    trimmed, texts, finished = [], [], []
    for ids in generated:
        end = next((i for i, token in enumerate(ids) if token in eos_ids), None)
        done = end is not None
        kept = ids[: end + 1] if done else list(ids)
        trimmed.append(kept)
        finished.append(done)
        texts.append(tokenizer.decode(kept[:-1] if done else kept, skip_special_tokens=False))
    return trimmed, texts, finished


def rollout_rewards(rollouts: Rollouts, prompts: list[Prompt], config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and reward of every rollout.

    Returns:
        (correct [P, G] float 0/1: the boxed answer after the marker matches and the response ended
         with EOS; rewards [P, G] float32: ``length_penalised_rewards`` per group for "tlmre" and
         "attnpo", the correctness itself for "grpo").
    """
    g = rollouts.group_size
    lengths = rollouts.response_lengths.view(len(prompts), g)
    finished = torch.tensor(rollouts.finished, dtype=torch.float32).view(len(prompts), g)
    correct = torch.stack(
        [correctness(rollouts.texts[i * g : (i + 1) * g], p.answer, config.marker) for i, p in enumerate(prompts)]
    ) * finished
    if config.method == "grpo":
        return correct, correct.clone()
    rewards = torch.stack([length_penalised_rewards(correct[i], lengths[i], config.alpha_len) for i in range(len(prompts))])
    return correct, rewards


_PHRASE_COUNTER = SegmenterConfig()


def phrase_counts(response: str, marker: str = "</think>") -> dict[str, int]:
    """Occurrences of confused/reflection and summary phrases in a response's reasoning.

    The reasoning is the text before the marker (the whole response when the marker is missing). A
    phrase counts where a word starts, longest match first (so "Okay, so" is one summary phrase and
    "Hmm, wait" one confused phrase), with the phrase families of ``kfh_probe.segmentation``.

    Returns:
        {"confused": n, "summary": n}.
    """
    reasoning = response.split(marker, 1)[0]
    counts = {"confused": 0, "summary": 0}
    pos = 0
    while pos < len(reasoning):
        if pos == 0 or not reasoning[pos - 1].isalnum():
            found = _PHRASE_COUNTER.match(reasoning, pos)
            if found is not None:
                phrase, family = found
                if family in counts:
                    counts[family] += 1
                pos += len(phrase)
                continue
        pos += 1
    return counts


# ---------------------------------------------------------------------------------------------------
# Credit assignment
# ---------------------------------------------------------------------------------------------------


def uniform_token_advantages(advantages: torch.Tensor, rollouts: Rollouts) -> list[torch.Tensor]:
    """Every response token gets its response's outcome advantage.

    Args:
        advantages: [P, G].
    Returns:
        P*G float32 tensors [response_len_i].
    """
    flat = advantages.reshape(-1)
    return [torch.full((len(r),), float(a), dtype=torch.float32) for a, r in zip(flat, rollouts.response_ids)]


@torch.no_grad()
def kfh_step_scores(
    model: nn.Module, traces: list[TokenizedTrace], heads: list[tuple[int, int]], pad_id: int, batch_size: int
) -> list[torch.Tensor]:
    """Step scores of each trace: the mean over the given heads of ``step_scores`` (method page sec. 3).

    One forward per batch of ``batch_size`` traces, stopped after the deepest head's layer, capturing
    only the answer rows of the heads' layers (``capture_answer_attention``).

    Args:
        traces: aligned traces (absolute token spans).
        heads: the top-N Key-Focus Heads as (layer, query head).
    Returns:
        one float32 tensor [K_i] per trace.
    """
    layers = sorted({layer for layer, _ in heads})
    device = next(model.parameters()).device
    scores: list[torch.Tensor] = []
    for start in range(0, len(traces), batch_size):
        chunk = traces[start : start + batch_size]
        batch = collate(chunk, pad_id)
        captured = capture_answer_attention(
            model,
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            batch.answer_mask.to(device),
            layers=layers,
        )
        picked = torch.stack([captured.values[:, captured.layers.index(l), h] for l, h in heads], dim=1)  # [B, N, T]
        for b, trace in enumerate(chunk):
            scores.append(step_scores(picked[b, :, : trace.length].float().cpu(), trace.step_spans).mean(dim=0))
    return scores


@dataclass(frozen=True)
class StepRating:
    """The steps of one correct response and their Key-Focus-Head scores.

    Attributes:
        spans: K response-relative token spans [start, end) of the reasoning steps.
        scores: [K] float32 step scores (mean over the top-N heads).
        answer_len: |F|, tokens from after the end-of-thinking marker to the end (EOS included).
    """

    spans: list[tuple[int, int]]
    scores: torch.Tensor
    answer_len: int


def rate_steps(
    model: nn.Module,
    tokenizer,
    rollouts: Rollouts,
    correct: torch.Tensor,
    heads: list[tuple[int, int]],
    config: TrainConfig,
    pad_id: int,
) -> list[StepRating | None]:
    """Segment and score the steps of every correct response with the current policy's top-N heads.

    Each correct response is aligned on its generated ids (``align_generated``: steps and the answer
    span F) and, when it has at least two steps, scored with ``kfh_step_scores`` in batches of
    ``config.micro_batch_size``. Only ``rollouts.prompt_ids`` and ``rollouts.response_ids`` are read, so
    any slice of a step's rollouts can be rated on its own (a distributed engine rates each rank's share).

    Args:
        correct: [N] (or [P, G]) 0/1 correctness of the N rollouts.
    Returns:
        N entries: a ``StepRating``, or None for a response that is incorrect, has no single marker, or
        has fewer than two steps (such responses keep a uniform advantage).
    """
    flat_correct = correct.reshape(-1)
    aligned: dict[int, TokenizedTrace] = {}
    for i in range(len(rollouts.response_ids)):
        if flat_correct[i] > 0:
            trace = align_generated(tokenizer, rollouts.prompt_ids[i], rollouts.response_ids[i], config.marker)
            if trace is not None and len(trace.step_spans) >= 2:
                aligned[i] = trace
    order = sorted(aligned)
    scores = kfh_step_scores(model, [aligned[i] for i in order], heads, pad_id, config.micro_batch_size)
    ratings: list[StepRating | None] = [None] * len(rollouts.response_ids)
    for i, score in zip(order, scores):
        trace = aligned[i]
        prompt_len = len(rollouts.prompt_ids[i])
        ratings[i] = StepRating(
            [(a - prompt_len, b - prompt_len) for a, b in trace.step_spans],
            score,
            trace.answer_span[1] - trace.answer_span[0],
        )
    return ratings


def rescale_rollouts(
    rollouts: Rollouts,
    correct: torch.Tensor,
    advantages: torch.Tensor,
    ratings: list[StepRating | None],
    step: int,
    config: TrainConfig,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Per-token advantages of one step's rollouts from their step ratings (``rescale_group`` per group).

    Pure: no model. Responses without a rating keep a uniform advantage.

    Args:
        correct: [P, G] 0/1.
        advantages: [P, G] outcome advantages.
        ratings: P*G entries from ``rate_steps`` (None where a response is not rescaled).
        step: 0-based training step (for the attenuation schedule).
    Returns:
        (P*G float32 tensors [response_len_i],
         stats: "rescaled_responses", "steps", "attenuated_steps" summed over groups,
         "frac_attenuated" = attenuated_steps / steps (0 without steps), "mean_gamma" (1 without steps)).
    """
    g = rollouts.group_size
    if len(ratings) != len(rollouts.response_ids):
        raise ValueError(
            f"need one rating (or None) per rollout: {len(ratings)} ratings, {len(rollouts.response_ids)} rollouts"
        )
    p = group_accuracy(correct)
    outputs: list[torch.Tensor] = []
    totals = {"rescaled_responses": 0.0, "steps": 0.0, "attenuated_steps": 0.0}
    gamma_sum = 0.0
    for group in range(correct.shape[0]):
        members = range(group * g, (group + 1) * g)
        token_advantages, stats = rescale_group(
            correct[group].bool(),
            advantages[group],
            step_scores=[None if ratings[i] is None else ratings[i].scores for i in members],
            step_spans=[None if ratings[i] is None else ratings[i].spans for i in members],
            answer_lens=[1 if ratings[i] is None else ratings[i].answer_len for i in members],
            total_lens=[len(rollouts.prompt_ids[i]) + len(rollouts.response_ids[i]) for i in members],
            response_lens=[len(rollouts.response_ids[i]) for i in members],
            p=float(p[group]),
            step=step,
            config=config,
        )
        outputs += token_advantages
        for key in totals:
            totals[key] += stats[key]
        gamma_sum += stats["mean_gamma"] * stats["steps"]
    steps = totals["steps"]
    return outputs, {
        **totals,
        "frac_attenuated": totals["attenuated_steps"] / steps if steps else 0.0,
        "mean_gamma": gamma_sum / steps if steps else 1.0,
    }


def attnpo_token_advantages(
    model: nn.Module,
    tokenizer,
    rollouts: Rollouts,
    correct: torch.Tensor,
    advantages: torch.Tensor,
    heads: list[tuple[int, int]],
    step: int,
    config: TrainConfig,
    pad_id: int,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """AttnPO per-token advantages of one step's rollouts (method page section 6).

    ``rate_steps`` (alignment on the generated ids and the top-N heads' step scores under the current
    policy), then ``rescale_rollouts`` (``rescale_group`` per prompt group). Incorrect responses, and
    correct ones whose marker or steps cannot be placed, keep a uniform advantage.

    Args:
        correct: [P, G] 0/1.
        advantages: [P, G] outcome advantages.
        step: 0-based training step (for the attenuation schedule).
    Returns:
        see ``rescale_rollouts``.
    """
    ratings = rate_steps(model, tokenizer, rollouts, correct, heads, config, pad_id)
    return rescale_rollouts(rollouts, correct, advantages, ratings, step, config)


# ---------------------------------------------------------------------------------------------------
# Policy update
# ---------------------------------------------------------------------------------------------------


def _sequence_batch(
    rollouts: Rollouts, token_advantages: list[torch.Tensor], indices: list[int], pad_id: int
) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt+response ids and the [B, T-1] response mask and advantages, aligned with
    the next-token log-probs (position t predicts token t+1)."""
    sequences = [rollouts.prompt_ids[i] + rollouts.response_ids[i] for i in indices]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    mask = torch.zeros((len(indices), width - 1), dtype=torch.float32)
    advantages = torch.zeros((len(indices), width - 1), dtype=torch.float32)
    for b, (i, seq) in enumerate(zip(indices, sequences)):
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
        first = len(rollouts.prompt_ids[i]) - 1
        n = len(rollouts.response_ids[i])
        mask[b, first : first + n] = 1.0
        advantages[b, first : first + n] = token_advantages[i]
    return input_ids, attention_mask, mask, advantages


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] float32 log-probability of each next token (token t+1 given tokens 0..t)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)


def accumulate_policy_gradient(
    model: nn.Module,
    ref_model: nn.Module | None,
    rollouts: Rollouts,
    token_advantages: list[torch.Tensor],
    config: TrainConfig,
    pad_id: int,
) -> dict[str, float]:
    """Gradient of the token-mean PPO-clip loss of all rollouts, left (clipped) in the parameters' ``.grad``.

    Micro-batches of ``config.micro_batch_size`` sequences are accumulated with the whole batch's token
    count as the denominator, so the gradient is that of the full batch's token mean. The caller applies
    it (``optimizer.step()``), so that the weight update and the run's bookkeeping happen together.

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
        input_ids, attention_mask, mask, advantages = (
            t.to(device) for t in _sequence_batch(rollouts, token_advantages, chunk, pad_id)
        )
        ref_logprobs = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logprobs = sequence_logprobs(ref_model, input_ids, attention_mask)
        logprobs = sequence_logprobs(model, input_ids, attention_mask)
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
# Random state, checkpoints, final model
# ---------------------------------------------------------------------------------------------------


def capture_rng(data_rng: random.Random) -> dict:
    """Every random generator a step draws from: python, numpy, torch (CPU and CUDA), the prompt sampler."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data": data_rng.getstate(),
    }


def restore_rng(state: dict, data_rng: random.Random) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_rng.setstate(state["data"])


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block has finished, then raise KeyboardInterrupt.

    Outside the main thread signals cannot be handled, and the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint folder with the highest step, or None (temporary folders are ignored)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_DIR.match(p.name)))
    return found[-1][1] if found else None


def save_checkpoint(
    out: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: dict,
    metrics: list[dict],
    config: TrainConfig,
) -> Path:
    """Write ``out/checkpoints/step-XXXXXXXX/`` atomically (a temporary folder, then ``os.replace``).

    Contents: ``state.pt`` (model, optimiser and scheduler state dicts, random states, step),
    ``metrics.jsonl`` (every metrics line so far), ``config.json``. Keeps the newest
    ``KEEP_CHECKPOINTS`` checkpoints.
    """
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with _deferred_interrupt():
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
            },
            tmp / "state.pt",
        )
        atomic_write_jsonl(tmp / "metrics.jsonl", metrics)
        atomic_write_json(tmp / "config.json", dataclasses.asdict(config))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted(p for p in root.iterdir() if _CHECKPOINT_DIR.match(p.name))
        for old in complete[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, list[dict], dict]:
    """(state from ``state.pt``, metrics lines, saved config as a dict) of a checkpoint folder."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return state, metrics, saved


class ResumeError(ValueError):
    """A resume whose settings differ from the checkpoint's in a way that would change the run."""


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume with settings that would change the run (only ``RESUMABLE_CHANGES`` may differ).

    Raises:
        ResumeError: naming every differing setting with both values.
    """
    current = dataclasses.asdict(config)
    changed = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}"
        for k in current
        if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]
    ]
    if changed:
        raise ResumeError(f"cannot resume from {path}: the config differs in " + "; ".join(changed))


def save_final(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """Save the policy and tokenizer as a Hugging Face folder ``out/final`` (atomically replaced)."""
    final = Path(out) / "final"
    tmp = Path(out) / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with _deferred_interrupt():
        if final.exists():
            old = Path(out) / f".old-final-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    return final


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
    """

    model: nn.Module
    tokenizer: object
    prompts: PromptSource
    heads: list[tuple[int, int]]
    pad_id: int


def require_model_dir(path: str | Path) -> None:
    """Refuse a path that is not a local Hugging Face model folder (before any loader tries the Hub)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")


def prepare_run(config: TrainConfig) -> RunInputs:
    """Load and check everything a run needs, refusing bad inputs before any training.

    ``config.model`` and (for "attnpo") ``config.manifest`` must be set; ``config.data`` None means the
    organism's task generator.

    Raises:
        DataError: rows without a prompt or a checkable answer, with their line numbers.
        kfh_probe.manifest.ManifestError: an unreadable or invalid manifest.
        kfh_probe.manifest.ManifestMismatchError: a manifest made for another model (shape always;
            weight fingerprint unless ``config.allow_finetuned``), naming the mismatch.
        ValueError: a missing path or an impossible setting (more heads asked for than ranked).
    """
    from kfh_probe.loading import load_model, load_tokenizer, pad_token_id
    from kfh_probe.manifest import check_model_matches, load_manifest, top_heads

    if config.model is None:
        raise ValueError("no policy model: set 'model' (attnpo-train run --model DIR)")
    if config.method == "attnpo" and config.manifest is None:
        raise ValueError("method 'attnpo' needs a KFH manifest: set 'manifest' (attnpo-train run --manifest M)")
    require_model_dir(config.model)
    source = PromptSource(None if config.data is None else load_prompts(config.data))
    manifest = load_manifest(config.manifest) if config.method == "attnpo" else None
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, "float32", config.device)
    heads: list[tuple[int, int]] = []
    if manifest is not None:
        check_model_matches(manifest, model, allow_finetuned=config.allow_finetuned)
        heads = top_heads(manifest, config.top_n_heads)
    return RunInputs(model, tokenizer, source, heads, pad_token_id(tokenizer))


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
    rollouts = generate_rollouts(model, tokenizer, prompts, config.group_size, config.max_new_tokens, config.temperature)
    correct, rewards = rollout_rewards(rollouts, prompts, config)
    advantages = group_advantages(rewards, config.estimator)
    t1 = time.perf_counter()
    rescale_stats = {"rescaled_responses": 0.0, "frac_attenuated": 0.0, "mean_gamma": 1.0}
    if config.method == "attnpo":
        token_advantages, stats = attnpo_token_advantages(
            model, tokenizer, rollouts, correct, advantages, inputs.heads, step, config, inputs.pad_id
        )
        rescale_stats = {k: stats[k] for k in rescale_stats}
    else:
        token_advantages = uniform_token_advantages(advantages, rollouts)
    t2 = time.perf_counter()
    update = accumulate_policy_gradient(model, ref_model, rollouts, token_advantages, config, inputs.pad_id)
    t3 = time.perf_counter()
    phrases = [phrase_counts(text, config.marker) for text in rollouts.texts]
    return {
        "step": step + 1,
        "reward_mean": float(rewards.mean()),
        "accuracy": float(correct.mean()),
        "response_tokens_mean": float(rollouts.response_lengths.mean()),
        "truncated_frac": 1.0 - _mean([float(f) for f in rollouts.finished]),
        "advantage_abs_mean": float(advantages.abs().mean()),
        **rescale_stats,
        "confused_per_response": _mean([c["confused"] for c in phrases]),
        "summary_per_response": _mean([c["summary"] for c in phrases]),
        **update,
        "time_rollout_s": t1 - t0,
        "time_scoring_s": t2 - t1,
        "time_update_s": t3 - t2,
    }


def train(inputs: RunInputs, config: TrainConfig, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train for ``config.steps`` steps, writing metrics, checkpoints and the final model under ``config.out``.

    Args:
        inputs: the checked model, tokenizer, prompts and heads (see ``RunInputs``).
        resume: continue from the newest checkpoint in ``out/checkpoints`` (FileNotFoundError when there is
            none, ResumeError when its settings differ beyond ``RESUMABLE_CHANGES``).
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
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_root(out)}")
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
            with _deferred_interrupt():
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
    save_final(model, inputs.tokenizer, out)
    return metrics
