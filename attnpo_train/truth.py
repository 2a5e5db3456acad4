"""Ground truth for rollouts the organism's labeler can read: which steps a response has, and whether
each step that credit assignment rated is essential.

Papers cannot measure this; on the embedded organism every step has a known label
(``kfh_probe.organism.labeler``), so the trainer can log which redundancy RL removes and how precise
AttnPO's attenuation is. Everything here returns ``None`` (absent, not zero) for a response the labeler
cannot read: a prompt that is not an organism prompt, or a response without exactly one ``</think>``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from kfh_probe import REDUNDANT_KINDS, Rollouts, TraceFormatError, credit_shares, label_trace, step_accounting

__all__ = ["ACCOUNT_KEYS", "GroundTruth", "boundary_correlation", "credit_precision", "labeled_step_starts",
           "mean_accounting", "rated_step_truth", "step_accounting"]

ACCOUNT_KEYS = ("essential_steps", "redundant_steps", *REDUNDANT_KINDS, "missing_essential", "skipped_reread")
"""The per-response step counts that training metrics and evaluation report (means over responses)."""


def mean_accounting(accounts: list[dict[str, int] | None]) -> dict[str, float] | None:
    """Means over the readable responses (``step_accounting`` per response) of :data:`ACCOUNT_KEYS`,
    plus ``labelled_fraction``; None when no response is readable."""
    readable = [a for a in accounts if a is not None]
    if not readable:
        return None
    means = {key: statistics.fmean(a[key] for a in readable) for key in ACCOUNT_KEYS}
    return {**means, "labelled_fraction": len(readable) / len(accounts)}


@dataclass(frozen=True)
class GroundTruth:
    """What the organism's labeler reads in one training step's responses.

    Attributes:
        prompt_texts: P*G prompt texts, one per rollout.
        accounting: ``mean_accounting`` of the responses (at least one is readable).
    """

    prompt_texts: list[str]
    accounting: dict[str, float]

    @classmethod
    def read(cls, prompt_texts: list[str], rollouts: Rollouts) -> "GroundTruth | None":
        """The ground truth of ``rollouts``, or None when the labeler can read none of the responses."""
        accounting = mean_accounting([step_accounting(p, r) for p, r in zip(prompt_texts, rollouts.texts)])
        return None if accounting is None else cls(prompt_texts, accounting)

    def rated_steps(self, tokenizer, rollouts: Rollouts, spans: list[list[tuple[int, int]] | None]) -> list[list[bool] | None]:
        """``rated_step_truth`` of every rollout's rated steps (None where it has none or is unreadable).

        Args:
            spans: per rollout, its rated steps as token spans [start, end) relative to the response, or None.
        """
        truth: list[list[bool] | None] = []
        for i, steps in enumerate(spans):
            if steps is None:
                truth.append(None)
                continue
            ids = rollouts.response_ids[i]
            ranges = [(len(tokenizer.decode(ids[:a], skip_special_tokens=False)),
                       len(tokenizer.decode(ids[:b], skip_special_tokens=False))) for a, b in steps]
            truth.append(rated_step_truth(self.prompt_texts[i], rollouts.texts[i], ranges))
        return truth

    def credit_metrics(self, tokenizer, rollouts: Rollouts, advantages: torch.Tensor,
                       token_advantages: dict[int, torch.Tensor]) -> dict[str, float | None]:
        """Where the step's credit fell, by ground truth.

        Args:
            advantages: [P, G] outcome advantages (the sign of a response's credit).
            token_advantages: per rollout index, the per-token advantages the update used.
        Returns:
            ``credit_shares`` of the readable responses under their outcome advantages
            ("redundant_in_positive_share", "essential_in_negative_share"), and "boundary_redundant_corr":
            ``boundary_correlation`` of the per-token advantages at the first token of every labeled step.
        """
        outcome = advantages.reshape(-1).tolist()
        accounts = [step_accounting(p, r) for p, r in zip(self.prompt_texts, rollouts.texts)]
        readable = [(a, acc) for a, acc in zip(outcome, accounts) if acc is not None]
        shares = credit_shares([a for a, _ in readable], [acc["redundant_steps"] for _, acc in readable],
                               [acc["essential_steps"] for _, acc in readable])
        boundaries: list[tuple[float, bool]] = []
        for i, values in sorted(token_advantages.items()):
            starts = labeled_step_starts(self.prompt_texts[i], rollouts.texts[i])
            if starts is None:
                continue
            ids = rollouts.response_ids[i]
            for char, essential in starts:
                token = _token_at(tokenizer, ids, char)
                if token is not None and token < len(values):
                    boundaries.append((float(values[token]), not essential))
        return {**shares, "boundary_redundant_corr": boundary_correlation(boundaries)}


def _token_at(tokenizer, ids: list[int], char: int) -> int | None:
    """The index of the token of ``ids`` whose decoded text holds character ``char`` (None past the end)."""
    low, high = 0, len(ids)  # the smallest t with len(decode(ids[: t + 1])) > char
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=False)) > char:
            high = mid
        else:
            low = mid + 1
    return low if low < len(ids) else None


def labeled_step_starts(prompt: str, response: str) -> list[tuple[int, bool]] | None:
    """The character position in ``response`` where each of the labeler's line steps starts, and whether it is
    essential (None when the labeler cannot read the response)."""
    try:
        labeled = label_trace(prompt, response)
    except TraceFormatError:
        return None
    starts, pos = [], 0
    for step in labeled.steps:
        starts.append((pos, step["label"] == "essential"))
        pos += len(step["text"])
    return starts


def boundary_correlation(boundaries: list[tuple[float, bool]]) -> float | None:
    """Pearson correlation between the advantage at a step's first token and whether the step is redundant,
    pooled over the step boundaries given (None when either side has no variance). Negative: the update makes
    the choice to take a redundant step less likely, as a whole, than the choice to take an essential one.

    Args:
        boundaries: (advantage at the step's first token, step is redundant) per labeled step.
    """
    if len(boundaries) < 2:
        return None
    xs = [a for a, _ in boundaries]
    ys = [float(r) for _, r in boundaries]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def rated_step_truth(prompt: str, response: str, step_ranges: list[tuple[int, int]]) -> list[bool] | None:
    """Whether each of a response's rated steps is essential by ground truth.

    The rated steps come from the project's segmenter, the truth from the labeler's line steps; they are
    matched by character position in the response: a rated step is essential when it overlaps an
    essential line step.

    Args:
        step_ranges: the rated steps' character ranges [start, end) in ``response``.
    Returns:
        one flag per rated step, or None when the labeler cannot read the response.
    """
    try:
        labeled = label_trace(prompt, response)
    except TraceFormatError:
        return None
    essential_ranges, pos = [], 0
    for step in labeled.steps:  # the labeler's line steps, which concatenate to the reasoning
        if step["label"] == "essential":
            essential_ranges.append((pos, pos + len(step["text"])))
        pos += len(step["text"])
    return [any(a < end and start < b for a, b in essential_ranges) for start, end in step_ranges]


def credit_precision(
    gammas: list[torch.Tensor | None], advantages: list[float], truth: list[list[bool] | None]
) -> dict[str, float | None]:
    """How precise step-level credit was against the ground truth, over one training step's responses.

    Args:
        gammas: per response, the [K] step multipliers (None where the response was not rescaled).
        advantages: per response, its outcome advantage A_i.
        truth: per response, K flags "essential" (``rated_step_truth``; None when unreadable).
    Returns:
        "pos_attenuated_steps": steps of A > 0 responses scaled below 1 (with known truth);
        "pos_precision": the fraction of those that are truly redundant (None without any);
        "neg_shielded_steps": steps of A < 0 responses set to 0;
        "neg_precision": the fraction of those that are truly essential (None without any).
    """
    pos, pos_right, neg, neg_right = 0, 0, 0, 0
    for gamma, advantage, flags in zip(gammas, advantages, truth):
        if gamma is None or flags is None or len(flags) != len(gamma):
            continue
        for g, essential in zip(gamma.tolist(), flags):
            if advantage > 0 and g < 1.0:
                pos += 1
                pos_right += not essential
            elif advantage < 0 and g == 0.0:
                neg += 1
                neg_right += essential
    return {
        "pos_attenuated_steps": float(pos),
        "pos_precision": pos_right / pos if pos else None,
        "neg_shielded_steps": float(neg),
        "neg_precision": neg_right / neg if neg else None,
    }
