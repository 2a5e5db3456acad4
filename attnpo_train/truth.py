"""Ground truth for rollouts the organism's labeler can read: which steps a response has, and whether
each step that credit assignment rated is essential.

Papers cannot measure this; on the embedded organism every step has a known label
(``kfh_probe.organism.labeler``), so the trainer can log which redundancy RL removes and how precise
AttnPO's attenuation is. Everything here returns ``None`` (absent, not zero) for a response the labeler
cannot read: a prompt that is not an organism prompt, or a response without exactly one ``</think>``.
"""

from __future__ import annotations

import statistics
from bisect import bisect_right
from dataclasses import dataclass

import torch

from kfh_probe import (
    REDUNDANT_KINDS, LabeledTrace, Rollouts, TraceFormatError, credit_shares, generated_char_offsets, label_trace,
    step_accounting,
)

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
    """What the organism's labeler reads in one training step's responses (each labeled once, in ``read``).

    Attributes:
        labels: per rollout, the labeler's reading of its response (None where it cannot read it).
        accounting: ``mean_accounting`` of the responses (at least one is readable).
    """

    labels: list[LabeledTrace | None]
    accounting: dict[str, float]

    @classmethod
    def read(cls, prompt_texts: list[str], rollouts: Rollouts) -> "GroundTruth | None":
        """The ground truth of ``rollouts``, or None when the labeler can read none of the responses."""
        labels = [_label(p, r) for p, r in zip(prompt_texts, rollouts.texts)]
        accounting = mean_accounting([None if labeled is None else labeled.accounting() for labeled in labels])
        return None if accounting is None else cls(labels, accounting)

    def rated_steps(self, tokenizer, rollouts: Rollouts, spans: list[list[tuple[int, int]] | None]) -> list[list[bool] | None]:
        """``rated_step_truth`` of every rollout's rated steps (None where it has none or is unreadable).

        Args:
            spans: per rollout, its rated steps as token spans [start, end) relative to the response, or None.
        """
        truth: list[list[bool] | None] = []
        for i, steps in enumerate(spans):
            if steps is None or self.labels[i] is None:
                truth.append(None)
                continue
            ids = rollouts.response_ids[i]
            ranges = [(len(tokenizer.decode(ids[:a], skip_special_tokens=False)),
                       len(tokenizer.decode(ids[:b], skip_special_tokens=False))) for a, b in steps]
            truth.append(_overlaps_essential(_line_steps(self.labels[i]), ranges))
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
        readable = [(a, labeled.accounting()) for a, labeled in zip(advantages.reshape(-1).tolist(), self.labels)
                    if labeled is not None]
        shares = credit_shares([a for a, _ in readable], [acc["redundant_steps"] for _, acc in readable],
                               [acc["essential_steps"] for _, acc in readable])
        boundaries: list[tuple[float, bool]] = []
        for i, values in sorted(token_advantages.items()):
            if self.labels[i] is None:
                continue
            text, token_starts = generated_char_offsets(tokenizer, rollouts.response_ids[i])
            for start, _, essential in _line_steps(self.labels[i]):
                token = bisect_right(token_starts, start) - 1  # the token whose text holds character ``start``
                if start < len(text) and token < len(values):
                    boundaries.append((float(values[token]), not essential))
        return {**shares, "boundary_redundant_corr": boundary_correlation(boundaries)}


def _label(prompt: str, response: str) -> LabeledTrace | None:
    """``label_trace``, or None when the labeler cannot read the response."""
    try:
        return label_trace(prompt, response)
    except TraceFormatError:
        return None


def _line_steps(labeled: LabeledTrace) -> list[tuple[int, int, bool]]:
    """The labeler's line steps as character ranges [start, end) of the response (they concatenate to its
    reasoning), each with whether it is essential."""
    out, pos = [], 0
    for step in labeled.steps:
        out.append((pos, pos + len(step["text"]), step["label"] == "essential"))
        pos += len(step["text"])
    return out


def labeled_step_starts(prompt: str, response: str) -> list[tuple[int, bool]] | None:
    """The character position in ``response`` where each of the labeler's line steps starts, and whether it is
    essential (None when the labeler cannot read the response)."""
    labeled = _label(prompt, response)
    return None if labeled is None else [(start, essential) for start, _, essential in _line_steps(labeled)]


def boundary_correlation(boundaries: list[tuple[float, bool]]) -> float | None:
    """Pearson correlation between the advantage at a step's first token and whether the step is redundant,
    pooled over the step boundaries given (None when either side has no variance). Negative: the update makes
    the choice to take a redundant step less likely, as a whole, than the choice to take an essential one.

    Args:
        boundaries: (advantage at the step's first token, step is redundant) per labeled step.
    """
    try:
        return statistics.correlation([a for a, _ in boundaries], [float(r) for _, r in boundaries])
    except statistics.StatisticsError:  # fewer than two boundaries, or a side without variance
        return None


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
    labeled = _label(prompt, response)
    return None if labeled is None else _overlaps_essential(_line_steps(labeled), step_ranges)


def _overlaps_essential(lines: list[tuple[int, int, bool]], step_ranges: list[tuple[int, int]]) -> list[bool]:
    """Per character range, whether it overlaps an essential line step."""
    essential = [(start, end) for start, end, is_essential in lines if is_essential]
    return [any(a < end and start < b for a, b in essential) for start, end in step_ranges]


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
