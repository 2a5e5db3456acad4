"""Rollout-level credit assignment, shared by the single-machine loop (``attnpo_train.loop``) and the TRL
adapter (``attnpo_train.trl``), so that both give the same per-token advantages for the same rollouts.

- ``rollout_rewards``: correctness (a response cut at ``max_new_tokens`` without EOS is incorrect) and
  the TLMRE length-penalised reward ("tlmre", "attnpo") or plain correctness ("rloo");
- ``uniform_token_advantages``: every response token gets its response's outcome advantage;
- ``attnpo_token_advantages`` = ``rate_steps`` (steps aligned on the generated ids and scored by the
  top-N Key-Focus Heads of the current policy, ``kfh_probe.StepScorer.head_scores``: a separate no-grad
  forward) then
  ``rescale_rollouts`` (``rescale_group`` per prompt group; pure, no model);
- ``FusedStepCredit``: the same advantages computed inside the policy-gradient forward the update runs
  anyway, one micro-batch at a time (``TrainConfig.fused_scoring``, the default), with no forward of its
  own; it is one ``UpdateCredit``, the loop's hook for per-token signals read off the update's forward;
- ``phrase_counts``: confused/summary phrase counts of a response, logged as metrics.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from attnpo_train.advantages import group_accuracy, rescale_group
from attnpo_train.config import TrainConfig
from attnpo_train.data import Prompt
from attnpo_train.rewards import correctness, length_penalised_rewards
from attnpo_train.truth import ratings_truth
from kfh_probe import SegmenterConfig, StepScorer, align_generated
from kfh_probe.alignment import TokenizedTrace
from kfh_probe.capture import AnswerRowRecorder, answer_rows, attention_calls
from kfh_probe.grading import resolve_grader
from kfh_probe.sampling import Rollouts
from kfh_probe.scoring import step_scores

# ---------------------------------------------------------------------------------------------------
# Rewards and phrase counts
# ---------------------------------------------------------------------------------------------------


def rollout_rewards(rollouts: Rollouts, prompts: list[Prompt], config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and reward of every rollout.

    Returns:
        (correct [P, G] float 0/1: the boxed answer after the marker matches (``config.grader``) and the
         response ended with EOS; rewards [P, G] float32: ``length_penalised_rewards`` per group for "tlmre" and
         "attnpo", the correctness itself for "rloo").
    """
    g = rollouts.group_size
    grader = resolve_grader(config.grader, organism=config.data is None)
    lengths = rollouts.response_lengths.view(len(prompts), g)
    finished = torch.tensor(rollouts.finished, dtype=torch.float32).view(len(prompts), g)
    correct = torch.stack(
        [correctness(rollouts.texts[i * g : (i + 1) * g], p.answer, config.marker, grader) for i, p in enumerate(prompts)]
    ) * finished
    if config.method == "rloo":
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
    score: bool = True,
    segmenter: SegmenterConfig | None = None,
) -> list[StepRating | None]:
    """Segment and score the steps of every correct response with the current policy's top-N heads.

    Each correct response is aligned on its generated ids (``align_generated``: steps cut by
    ``segmenter``, the manifest's (``kfh_probe.manifest_segmenter``; the default when None), and the
    answer span F) and, when it has at least two steps, scored with ``StepScorer.head_scores`` (the mean
    over ``heads``; ``hf`` capture) in batches of ``config.micro_batch_size``. Only ``rollouts.prompt_ids`` and ``rollouts.response_ids`` are read, so
    any slice of a step's rollouts can be rated on its own (a distributed engine rates each rank's share).

    Args:
        correct: [N] (or [P, G]) 0/1 correctness of the N rollouts.
        score: False skips the attention forward and leaves every score at 0 (for a control that
            replaces the scores, ``control_ratings``).
    Returns:
        N entries: a ``StepRating``, or None for a response that is incorrect, has no single marker, or
        has fewer than two steps (such responses keep a uniform advantage).
    """
    flat_correct = correct.reshape(-1)
    aligned: dict[int, TokenizedTrace] = {}
    for i in range(len(rollouts.response_ids)):
        if flat_correct[i] > 0:
            trace = align_generated(tokenizer, rollouts.prompt_ids[i], rollouts.response_ids[i], config.marker, segmenter)
            if trace is not None and len(trace.step_spans) >= 2:
                aligned[i] = trace
    order = sorted(aligned)
    if score:
        scores = StepScorer(model, pad_id, tokenizer).head_scores([aligned[i] for i in order], heads, config.micro_batch_size)
    else:
        scores = [torch.zeros(len(aligned[i].step_spans)) for i in order]
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
    indices: list[int] | None = None,
) -> tuple[list[torch.Tensor], dict]:
    """Per-token advantages of one step's rollouts from their step ratings (``rescale_group`` per group).

    Pure: no model. Responses without a rating keep a uniform advantage. A response's advantages depend
    on its own rating and its group's p and outcome advantage only, so any subset of the rollouts can be
    rescaled on its own (``indices``; the fused path rescales one update micro-batch at a time).

    Args:
        correct: [P, G] 0/1.
        advantages: [P, G] outcome advantages.
        ratings: P*G entries from ``rate_steps`` (None where a response is not rescaled); only those of
            ``indices`` are read.
        step: 0-based training step (for the attenuation schedule).
        indices: increasing rollout indices to rescale (None: all P*G).
    Returns:
        (one float32 tensor [response_len_i] per index,
         stats: "rescaled_responses", "steps", "attenuated_steps" summed over groups,
         "frac_attenuated" = attenuated_steps / steps (0 without steps), "mean_gamma" (1 without steps),
         "gammas": per index the [K] step multipliers, None where it was not rescaled).
    """
    g = rollouts.group_size
    if len(ratings) != len(rollouts.response_ids):
        raise ValueError(
            f"need one rating (or None) per rollout: {len(ratings)} ratings, {len(rollouts.response_ids)} rollouts"
        )
    indices = list(range(len(ratings))) if indices is None else indices
    p = group_accuracy(correct)
    outputs: list[torch.Tensor] = []
    gammas: list[torch.Tensor | None] = []
    parts: list[dict] = []
    for group in sorted({i // g for i in indices}):
        members = [i for i in indices if i // g == group]
        token_advantages, stats = rescale_group(
            correct[group, [i % g for i in members]].bool(),
            advantages[group, [i % g for i in members]],
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
        gammas += stats["gammas"]
        parts.append(stats)
    return outputs, {**merge_rescale_stats(parts), "gammas": gammas}


def merge_rescale_stats(parts: list[dict]) -> dict[str, float]:
    """The counts and means of ``rescale_group`` stats of disjoint sets of responses, over all of them.

    Returns:
        "rescaled_responses", "steps", "attenuated_steps" (sums), "frac_attenuated" (0 without steps),
        "mean_gamma" (step-weighted; 1 without steps).
    """
    totals = {key: sum(part[key] for part in parts) for key in ("rescaled_responses", "steps", "attenuated_steps")}
    gamma_sum = sum(part["mean_gamma"] * part["steps"] for part in parts)
    steps = totals["steps"]
    return {
        **totals,
        "frac_attenuated": totals["attenuated_steps"] / steps if steps else 0.0,
        "mean_gamma": gamma_sum / steps if steps else 1.0,
    }


def control_ratings(
    ratings: list[StepRating | None],
    credit: str,
    truth: list[list[bool] | None] | None,
    rollouts: Rollouts,
    seed: int,
) -> list[StepRating | None]:
    """The research controls of AttnPO's step scores (``TrainConfig.credit``); pure.

    - "attention": the Key-Focus Heads' scores, unchanged (AttnPO itself).
    - "shuffled": each response's scores permuted at random among its own steps (``seed``): the same
      formula, the same multiset of scores and so the same fraction of steps below the baseline, but no
      information about which step is which.
    - "oracle": scores from the ground truth instead of attention: a redundant step scores 0, an
      essential one 2 |F|/|o| (above the baseline p^alpha |F|/|o| for every p and alpha >= 0), so Pos-Adv
      attenuates exactly the redundant steps and Neg-Adv shields exactly the essential ones. Responses
      whose truth is unknown are not rescaled.

    Args:
        ratings: from ``rate_steps``.
        truth: per rollout, whether each rated step is essential (``attnpo_train.truth.rated_step_truth``);
            needed for "oracle" only.
        seed: seeds the permutations of "shuffled".
    """
    if credit == "attention":
        return ratings
    if credit == "shuffled":
        return [None if r is None else StepRating(r.spans, r.scores[order], r.answer_len)
                for r, order in zip(ratings, shuffled_orders(ratings, seed))]
    if credit == "oracle":
        if truth is None:
            raise ValueError("credit 'oracle' needs the ground-truth label of every rated step")
        out: list[StepRating | None] = []
        for i, (rating, flags) in enumerate(zip(ratings, truth)):
            if rating is None or flags is None or len(flags) != len(rating.spans):
                out.append(None)
                continue
            uniform = rating.answer_len / (len(rollouts.prompt_ids[i]) + len(rollouts.response_ids[i]))
            scores = torch.tensor([2.0 * uniform if essential else 0.0 for essential in flags], dtype=torch.float32)
            out.append(StepRating(rating.spans, scores, rating.answer_len))
        return out
    raise ValueError(f"credit must be one of attention, shuffled, oracle; got {credit!r}")


def shuffled_orders(ratings: list[StepRating | None], seed: int) -> list[torch.Tensor | None]:
    """The "shuffled" control's permutation of each rated response's K steps (seeded; None where unrated).

    They depend on the number of steps only, so they can be drawn before the scores exist."""
    generator = torch.Generator().manual_seed(seed)
    return [None if r is None else torch.randperm(len(r.scores), generator=generator) for r in ratings]


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
    prompt_texts: list[str] | None = None,
    segmenter: SegmenterConfig | None = None,
) -> tuple[list[torch.Tensor], dict]:
    """AttnPO per-token advantages of one step's rollouts (method page section 6).

    ``rate_steps`` (alignment on the generated ids and the top-N heads' step scores under the current
    policy; no forward for the "oracle" control), ``control_ratings`` (``config.credit``), then
    ``rescale_rollouts`` (``rescale_group`` per prompt group). Incorrect responses, and correct ones
    whose marker or steps cannot be placed, keep a uniform advantage.

    Args:
        correct: [P, G] 0/1.
        advantages: [P, G] outcome advantages.
        step: 0-based training step (for the attenuation schedule).
        prompt_texts: P*G prompt texts when the ground truth can be read (the organism), else None.
        segmenter: cuts the responses into steps (``rate_steps``).
    Returns:
        see ``rescale_rollouts``; stats also holds "truth": per rollout, whether each rated step is
        essential by ground truth (``attnpo_train.truth.ratings_truth``; None without ``prompt_texts``).
    """
    ratings = rate_steps(model, tokenizer, rollouts, correct, heads, config, pad_id, score=config.credit != "oracle",
                         segmenter=segmenter)
    truth = None if prompt_texts is None else ratings_truth(tokenizer, rollouts, ratings, prompt_texts)
    ratings = control_ratings(ratings, config.credit, truth, rollouts, seed=control_seed(config, step))
    token_advantages, stats = rescale_rollouts(rollouts, correct, advantages, ratings, step, config)
    return token_advantages, {**stats, "truth": truth}


def control_seed(config: TrainConfig, step: int) -> int:
    """Seed of the "shuffled" control's permutations at a training step."""
    return config.seed * 1_000_003 + step


# ---------------------------------------------------------------------------------------------------
# Credit read off the update's own forward
# ---------------------------------------------------------------------------------------------------


def answer_row_recorder(
    ratings: list[StepRating | None],
    lengths: list[int],
    offsets: list[int],
    shape: torch.Size,
    heads: dict[int, list[int]],
    device: torch.device,
) -> AnswerRowRecorder:
    """A recorder of the answer rows of the rated sequences of a padded batch (the others get none).

    Args:
        ratings: per row b of the batch, its rating (None: not rated).
        lengths: per row, prompt + response tokens; offsets: per row, the column where its first token
            sits (0 with right padding, the left padding otherwise).
        shape: [B, T] of the batch; heads: per layer, the query heads to keep.
    """
    answer_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for b, (rating, length, offset) in enumerate(zip(ratings, lengths, offsets)):
        if rating is not None:
            answer_mask[b, offset + length - rating.answer_len : offset + length] = True
    rows, row_valid = answer_rows(answer_mask)
    return AnswerRowRecorder(rows, row_valid, heads)


def scored_rating(rating: StepRating, answer_attention: torch.Tensor, prompt_len: int) -> StepRating:
    """``rating`` with the step scores of ``StepScorer.head_scores``, from its sequence's answer-row sums.

    Args:
        answer_attention: [N, T_i] per head, the attention each position of the sequence (prompt and
            response, from its first token) receives summed over the answer rows.
    """
    spans = [(a + prompt_len, b + prompt_len) for a, b in rating.spans]
    return StepRating(rating.spans, step_scores(answer_attention.float().cpu(), spans).mean(dim=0), rating.answer_len)


class UpdateCredit(Protocol):
    """Per-token advantages that come out of the policy-gradient forward, one micro-batch at a time.

    ``attnpo_train.loop.accumulate_policy_gradient`` runs, for each micro-batch of rollout ``indices``
    (increasing; every rollout in exactly one micro-batch, in order)::

        with credit.observe(model, indices, input_ids):     # [B, T] right-padded prompt + response
            logprobs = forward(model, input_ids)            # the update's own forward, with grad
        advantages = credit.token_advantages(indices)       # B float32 tensors [response_len_i]
        loss(logprobs, advantages).backward()

    ``observe`` may watch the forward's attention calls (``kfh_probe.capture.attention_calls``) and
    reduce them to whatever per-token signal it needs; ``FusedStepCredit`` is AttnPO's.
    """

    def observe(
        self, model: nn.Module, indices: list[int], input_ids: torch.Tensor
    ) -> contextlib.AbstractContextManager:
        ...

    def token_advantages(self, indices: list[int]) -> list[torch.Tensor]:
        ...


class FusedStepCredit:
    """AttnPO's per-token advantages computed inside the update's forward (``TrainConfig.fused_scoring``).

    The update is on-policy: the forward of each update micro-batch runs the policy that sampled the
    rollouts, so its attention is the attention the step scores need. Before the update, the
    constructor aligns the steps of every correct response (``rate_steps`` without a forward), reads
    their ground truth when it can, and prepares the controls (the "shuffled" permutations depend only
    on the step counts; "oracle" needs no attention, so nothing is observed). During the update,
    ``observe`` records the answer rows of the top-N heads only (detached float32, ``|F| x T`` per head,
    never ``T x T``; ``kfh_probe.capture.AnswerRowRecorder``), and ``token_advantages`` turns them into
    step scores (``step_scores``, mean over the heads, exactly as ``StepScorer.head_scores``), then gammas and
    per-token advantages (``rescale_rollouts`` on the micro-batch; p and the outcome advantages are the
    group's, known before the update). The result equals ``attnpo_token_advantages`` up to float
    rounding of the two forwards (tests).

    Args:
        tokenizer: the policy's tokenizer (for alignment on the generated ids).
        rollouts: the step's rollouts.
        correct: [P, G] 0/1; advantages: [P, G] outcome advantages.
        heads: the top-N Key-Focus Heads as (layer, query head).
        step: 0-based training step (schedule; seed of the "shuffled" control).
        prompt_texts: P*G prompt texts when the ground truth can be read (the organism), else None.
        segmenter: cuts the responses into steps (``rate_steps``).

    Attributes:
        truth: per rollout, whether each rated step is essential (None without ``prompt_texts``).
        seconds: time spent in ``observe``'s recording and in ``token_advantages`` so far (what AttnPO
            adds to a TLMRE update; on a GPU this is host time, kernels run asynchronously).
        handed_out: per rollout, the per-token advantages ``token_advantages`` returned (None before).
    """

    def __init__(
        self,
        tokenizer,
        rollouts: Rollouts,
        correct: torch.Tensor,
        advantages: torch.Tensor,
        heads: list[tuple[int, int]],
        step: int,
        config: TrainConfig,
        prompt_texts: list[str] | None = None,
        segmenter: SegmenterConfig | None = None,
    ) -> None:
        ratings = rate_steps(None, tokenizer, rollouts, correct, heads, config, pad_id=0, score=False, segmenter=segmenter)
        self.truth = None if prompt_texts is None else ratings_truth(tokenizer, rollouts, ratings, prompt_texts)
        self._heads: dict[int, list[int]] = {}
        if config.credit == "oracle":
            ratings = control_ratings(ratings, "oracle", self.truth, rollouts, seed=0)
        else:
            for layer, head in heads:
                self._heads.setdefault(layer, []).append(head)
        self._head_order = [(layer, self._heads[layer].index(head)) for layer, head in heads] if self._heads else []
        self._orders = shuffled_orders(ratings, control_seed(config, step)) if config.credit == "shuffled" else None
        self._ratings = ratings
        self._rollouts, self._correct, self._advantages = rollouts, correct, advantages
        self._step, self._config = step, config
        self._gammas: list[torch.Tensor | None] = [None] * len(ratings)
        self.handed_out: list[torch.Tensor | None] = [None] * len(ratings)
        self._parts: list[dict] = []
        self.seconds = 0.0

    @contextlib.contextmanager
    def observe(self, model: nn.Module, indices: list[int], input_ids: torch.Tensor) -> Iterator[None]:
        """Record the top-N heads' answer rows of the rated rollouts among ``indices`` during the block's forward.

        Args:
            input_ids: [B, T] the micro-batch, prompt + response of ``indices[b]`` from position 0.
        Raises:
            ValueError: the model is in training mode with attention dropout (the scores would be noisy).
            kfh_probe.capture.UnsupportedModelError: a head's layer did not go through the attention interface.
        """
        rated = [b for b, i in enumerate(indices) if self._ratings[i] is not None] if self._heads else []
        if not rated:
            yield
            return
        start = time.perf_counter()
        if model.training and getattr(model.config, "attention_dropout", 0.0):
            raise ValueError("attention dropout is active (model.train()); step scores need the eval-mode attention")
        recorder = answer_row_recorder(
            [self._ratings[i] for i in indices], [self._length(i) for i in indices], [0] * len(indices),
            input_ids.shape, self._heads, input_ids.device,
        )

        def timed(*args) -> None:
            begin = time.perf_counter()
            recorder(*args)
            self.seconds += time.perf_counter() - begin

        self.seconds += time.perf_counter() - start
        with attention_calls(model, sorted(self._heads), timed):
            yield
        start = time.perf_counter()
        recorder.check_reported(model)
        picked = torch.stack([recorder.results[layer][:, j] for layer, j in self._head_order], dim=1)  # [B, N, T]
        for b in rated:
            i = indices[b]
            self._ratings[i] = scored_rating(self._ratings[i], picked[b, :, : self._length(i)],
                                             len(self._rollouts.prompt_ids[i]))
        self.seconds += time.perf_counter() - start

    def token_advantages(self, indices: list[int]) -> list[torch.Tensor]:
        """Per-token advantages of ``indices`` (after their ``observe`` block), B float32 tensors [response_len_i]."""
        start = time.perf_counter()
        ratings = list(self._ratings)
        if self._orders is not None:
            for i in indices:
                if ratings[i] is not None:
                    ratings[i] = StepRating(ratings[i].spans, ratings[i].scores[self._orders[i]], ratings[i].answer_len)
        values, stats = rescale_rollouts(self._rollouts, self._correct, self._advantages, ratings, self._step,
                                         self._config, indices=indices)
        for i, gammas, row in zip(indices, stats["gammas"], values):
            self._gammas[i] = gammas
            self.handed_out[i] = row
        self._parts.append(stats)
        self.seconds += time.perf_counter() - start
        return values

    def stats(self) -> dict:
        """After every micro-batch: the stats ``attnpo_token_advantages`` returns for the whole step."""
        return {**merge_rescale_stats(self._parts), "gammas": self._gammas, "truth": self.truth}

    def _length(self, i: int) -> int:
        return len(self._rollouts.prompt_ids[i]) + len(self._rollouts.response_ids[i])
