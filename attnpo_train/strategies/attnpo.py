"""AttnPO's credit (docs/method.md section 6): the steps of every correct response, rated by the top-N
Key-Focus Heads of the current policy, rescale its advantage step by step; and the research controls of
those ratings (``TrainConfig.credit``).

For every correct response ``prepare`` aligns the steps on the generated ids (``align_steps``: the manifest's
segmenter, the answer span F after the marker). ``observe`` records, during the forward, the answer rows of
the top-N heads only (detached float32, ``|F| x T`` per head, never ``T x T``; ``kfh_probe.AnswerRowRecorder``)
and ``read`` turns them into step scores (``kfh_probe.step_scores`` per head; with ``baseline: uniform`` the
mean over the heads, as ``kfh_probe.StepScorer.head_scores`` computes them, against the paper's bar |F|/|o|;
with ``baseline: reasoning`` each head's scores relative to its mean over the reasoning,
``kfh_probe.relative_step_scores``, against the manifest's calibrated margin tau). ``advantages`` applies the control and rescales
(``rescale_rollouts``: ``attnpo_train.advantages.rescale_group`` per prompt group; p and the outcome advantages
are the group's, known before the update). Incorrect responses, and correct ones whose marker or steps
cannot be placed, keep a uniform advantage.

The controls, for the embedded organism:

- "attention": the Key-Focus Heads' scores (AttnPO itself);
- "shuffled": each response's scores permuted at random among its own steps (``shuffled_orders``): the same
  formula, the same multiset of scores and so the same fraction of steps below the baseline, but no
  information about which step is which;
- "oracle": scores from the ground truth instead of attention (``oracle_ratings``; no attention is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attnpo_train.advantages import group_accuracy, rescale_group
from attnpo_train.config import TrainConfig
from attnpo_train.strategies.base import NO_RESCALING, CreditBatch, CreditStrategy, StrategyFile, register
from attnpo_train.truth import credit_precision
from kfh_probe import (
    AnswerRowRecorder, InputError, Rollouts, SegmenterConfig, align_generated, answer_rows, check_model_matches,
    default_manifest_path, load_manifest, manifest_segmenter, margin_for, relative_step_scores, step_scores, top_heads,
    uniform_bar,
)

CREDITS = ("attention", "shuffled", "oracle")
"""The values of ``TrainConfig.credit``: AttnPO's own scores and its two research controls."""


@dataclass(frozen=True)
class AlignedSteps:
    """Where the steps and the answer of one correct response lie.

    Attributes:
        spans: K response-relative token spans [start, end) of the reasoning steps.
        answer_len: |F|, tokens from after the end-of-thinking marker to the end (EOS included).
    """

    spans: list[tuple[int, int]]
    answer_len: int


@dataclass(frozen=True)
class StepRating:
    """The steps of one correct response and their scores.

    Attributes:
        spans: K response-relative token spans [start, end) of the reasoning steps.
        scores: [K] float32 step scores (mean over the top-N heads, relative ones, or a control's).
        bar: the baseline at p = 1 these scores are compared with (|F|/|o|, or the margin tau).
    """

    spans: list[tuple[int, int]]
    scores: torch.Tensor
    bar: float


def align_steps(
    tokenizer, rollouts: Rollouts, correct: torch.Tensor, marker: str, segmenter: SegmenterConfig | None = None
) -> list[AlignedSteps | None]:
    """The steps of every correct response, aligned on its generated ids (``kfh_probe.align_generated``: steps
    cut by ``segmenter``, the manifest's; the default when None).

    Only ``rollouts.prompt_ids`` and ``rollouts.response_ids`` are read.

    Args:
        correct: [N] (or [P, G]) 0/1 correctness of the N rollouts.
    Returns:
        N entries: ``AlignedSteps``, or None for a response that is incorrect, has no single marker, or has
        fewer than two steps (such responses keep a uniform advantage).
    """
    flat_correct = correct.reshape(-1)
    aligned: list[AlignedSteps | None] = [None] * len(rollouts.response_ids)
    for i, (prompt, response) in enumerate(zip(rollouts.prompt_ids, rollouts.response_ids)):
        if flat_correct[i] > 0:
            trace = align_generated(tokenizer, prompt, response, marker, segmenter)
            if trace is not None and len(trace.step_spans) >= 2:
                spans = [(a - len(prompt), b - len(prompt)) for a, b in trace.step_spans]
                aligned[i] = AlignedSteps(spans, trace.answer_span[1] - trace.answer_span[0])
    return aligned


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
    rescaled on its own (``indices``; the update rescales one micro-batch at a time).

    Args:
        correct: [P, G] 0/1.
        advantages: [P, G] outcome advantages.
        ratings: P*G entries (None where a response is not rescaled); only those of ``indices`` are read.
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
            bars=[1.0 if ratings[i] is None else ratings[i].bar for i in members],
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


def shuffled_orders(aligned: list[AlignedSteps | None], seed: int) -> list[torch.Tensor | None]:
    """The "shuffled" control's permutation of each aligned response's K steps (seeded; None where not aligned).

    They depend on the number of steps only, so they are drawn before the scores exist."""
    generator = torch.Generator().manual_seed(seed)
    return [None if a is None else torch.randperm(len(a.spans), generator=generator) for a in aligned]


def oracle_ratings(
    aligned: list[AlignedSteps | None], truth: list[list[bool] | None] | None, bars: list[float | None]
) -> list[StepRating | None]:
    """The "oracle" control's ratings: a redundant step scores 0, an essential one twice the response's bar
    (above the baseline p^alpha * bar for every p and alpha >= 0), so Pos-Adv attenuates exactly the redundant
    steps and Neg-Adv shields exactly the essential ones, whichever the baseline. Responses whose truth is
    unknown are not rescaled; pure.

    Args:
        truth: per rollout, whether each aligned step is essential (``attnpo_train.truth.GroundTruth.rated_steps``).
        bars: per rollout, its bar at p = 1 (None where it is not aligned).
    Raises:
        ValueError: ``truth`` is None.
    """
    if truth is None:
        raise ValueError("credit 'oracle' needs the ground-truth label of every rated step")
    out: list[StepRating | None] = []
    for i, (steps, flags) in enumerate(zip(aligned, truth)):
        if steps is None or flags is None or len(flags) != len(steps.spans):
            out.append(None)
            continue
        scores = torch.tensor([2.0 * bars[i] if essential else 0.0 for essential in flags], dtype=torch.float32)
        out.append(StepRating(steps.spans, scores, bars[i]))
    return out


def control_seed(config: TrainConfig, step: int) -> int:
    """Seed of the "shuffled" control's permutations at a training step."""
    return config.seed * 1_000_003 + step


@register("attnpo")
class AttnPO(CreditStrategy):
    """AttnPO: TLMRE rewards, advantages rescaled step by step by the manifest's top-N Key-Focus Heads.

    Attributes:
        heads: the top-N Key-Focus Heads as (layer, query head).
        segmenter: cuts the responses into steps: the manifest's (``kfh_probe.manifest_segmenter``).
        truth: per rollout of the step, whether each aligned step is essential (None without ground truth).
    """

    files = (StrategyFile("manifest", "KFH manifest", "pass --manifest M (make one with `kfh-probe sweep`)",
                          default_manifest_path),)
    controls = CREDITS

    def __init__(self, config: TrainConfig, ground_truth: bool = False) -> None:
        """Read the manifest (``config.manifest``, the organism's when None).

        Raises:
            kfh_probe.manifest.ManifestError: an unreadable or invalid manifest.
            InputError: more heads asked for than ranked; credit "oracle" without ground truth.
        """
        super().__init__(config, ground_truth)
        if config.credit == "oracle" and not ground_truth:
            raise InputError(f"credit 'oracle' needs ground-truth step labels, which only the organism's task has; "
                             f"{config.data or 'the prompts'} does not hold organism prompts")
        path = self.files[0].path(config)
        self.manifest = load_manifest(path)
        self.heads = top_heads(self.manifest, config.top_n_heads)
        self.segmenter = manifest_segmenter(self.manifest, Path(path).name)
        self.margin = margin_for(self.manifest, len(self.heads), str(path)) if config.baseline == "reasoning" else None
        self._by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self._by_layer.setdefault(layer, []).append(head)
        self.layers = sorted(self._by_layer)
        self.truth: list[list[bool] | None] | None = None

    def attach(self, model, tokenizer, gather_params=None) -> None:
        """Check the manifest against the policy (shape always; weight fingerprint unless ``allow_finetuned``).

        Raises:
            kfh_probe.ManifestMismatchError: naming the mismatch.
        """
        super().attach(model, tokenizer, gather_params)
        check_model_matches(self.manifest, model, self.config.allow_finetuned, gather_params=gather_params)

    def prepare(self, batch: CreditBatch) -> None:
        super().prepare(batch)
        rollouts = batch.rollouts
        self._aligned = align_steps(self.tokenizer, rollouts, batch.correct, self.config.marker, self.segmenter)
        spans = [None if a is None else a.spans for a in self._aligned]
        self.truth = None if batch.truth is None else batch.truth.rated_steps(self.tokenizer, rollouts, spans)
        credit = self.config.credit
        bars = [None if a is None else self._bar(i, a) for i, a in enumerate(self._aligned)]
        self._oracle = oracle_ratings(self._aligned, self.truth, bars) if credit == "oracle" else None
        if self._oracle is None:
            self.wanted = {i for i, a in enumerate(self._aligned) if a is not None}
        seed = control_seed(self.config, batch.step)
        self._orders = shuffled_orders(self._aligned, seed) if credit == "shuffled" else None
        self._gammas: list[torch.Tensor | None] = [None] * len(self._aligned)
        self._parts: list[dict] = []

    def recorder(self, indices, shape, offsets, device) -> AnswerRowRecorder:
        """Records the answer rows (|F| x T per head) of the rows ``wants``."""
        answer_mask = torch.zeros(shape, dtype=torch.bool, device=device)
        for b, i in enumerate(indices):
            if self.wants(i):
                end = offsets[b] + self._length(i)
                answer_mask[b, end - self._aligned[i].answer_len : end] = True
        rows, row_valid = answer_rows(answer_mask)
        return AnswerRowRecorder(rows, row_valid, self._by_layer)

    def read(self, indices, offsets, recorder: AnswerRowRecorder) -> dict[int, StepRating]:
        """The step scores of the recorded rows: per head the attention each step receives from the answer rows
        (``kfh_probe.step_scores``), then averaged over the heads, or made relative to each head's mean over the
        reasoning before they are averaged (``baseline: reasoning``)."""
        picked = torch.stack([recorder.results[layer][:, self._by_layer[layer].index(head)]
                              for layer, head in self.heads], dim=1)  # [batch, head, key]
        ratings = {}
        for b, i in enumerate(indices):
            if self.wants(i):
                steps, prompt_len = self._aligned[i], len(self.batch.rollouts.prompt_ids[i])
                attention = picked[b, :, offsets[b] : offsets[b] + self._length(i)].float().cpu()
                spans = [(a + prompt_len, e + prompt_len) for a, e in steps.spans]
                per_head = step_scores(attention, spans)  # [head, step]
                scores = (per_head.mean(dim=0) if self.margin is None
                          else relative_step_scores(per_head, [e - a for a, e in steps.spans]))
                ratings[i] = StepRating(steps.spans, scores, self._bar(i, steps))
        return ratings

    def advantages(self, indices: list[int]) -> list[torch.Tensor]:
        ratings: list[StepRating | None] = [None] * len(self._aligned)
        for i in indices:
            if self.wants(i):
                raise RuntimeError(f"rollout {i}'s attention was not read before its advantages")
            rating = self._oracle[i] if self._oracle is not None else self.readings.get(i)
            if rating is not None and self._orders is not None:
                rating = StepRating(rating.spans, rating.scores[self._orders[i]], rating.bar)
            ratings[i] = rating
        batch = self.batch
        values, stats = rescale_rollouts(batch.rollouts, batch.correct, batch.advantages, ratings, batch.step,
                                         self.config, indices=indices)
        for i, gammas in zip(indices, stats["gammas"]):
            self._gammas[i] = gammas
        self._parts.append(stats)
        return values

    def metrics(self) -> dict[str, float | None]:
        """``NO_RESCALING``'s counts of the step, and with ground truth the precision of the credit
        (``attnpo_train.truth.credit_precision``)."""
        stats = merge_rescale_stats(self._parts)
        out: dict[str, float | None] = {key: stats[key] for key in NO_RESCALING}
        if self.truth is not None:
            out.update(credit_precision(self._gammas, self.batch.advantages.reshape(-1).tolist(), self.truth))
        return out

    def _bar(self, i: int, steps: AlignedSteps) -> float:
        """The bar at p = 1 of rollout ``i``: the margin tau, or the paper's |F|/|o|."""
        if self.margin is not None:
            return self.margin
        return float(uniform_bar(torch.tensor([steps.answer_len]), torch.tensor([self._length(i)]))[0])

    def _length(self, i: int) -> int:
        return len(self.batch.rollouts.prompt_ids[i]) + len(self.batch.rollouts.response_ids[i])
