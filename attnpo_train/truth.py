"""Ground truth for rollouts the organism's labeler can read: which steps a response has, and whether
each step that credit assignment rated is essential.

Papers cannot measure this; on the embedded organism every step has a known label
(``kfh_probe.organism.labeler``), so the trainer can log which redundancy RL removes and how precise
AttnPO's attenuation is. Everything here returns ``None`` (absent, not zero) for a response the labeler
cannot read: a prompt that is not an organism prompt, or a response without exactly one ``</think>``.
"""

from __future__ import annotations

import statistics

import torch

from kfh_probe.organism.labeler import REDUNDANT_KINDS, TraceFormatError, label_trace, step_accounting

__all__ = ["ACCOUNT_KEYS", "credit_precision", "mean_accounting", "rated_step_truth", "step_accounting"]

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


def ratings_truth(tokenizer, rollouts, ratings: list, prompt_texts: list[str]) -> list[list[bool] | None]:
    """``rated_step_truth`` of every rated rollout (None where a rollout has no rating or is unreadable).

    Args:
        rollouts: a step's ``kfh_probe.sampling.Rollouts``.
        ratings: P*G entries from ``attnpo_train.credit.rate_steps`` (token spans relative to the response).
        prompt_texts: P*G prompt texts.
    """
    truth: list[list[bool] | None] = []
    for i, rating in enumerate(ratings):
        if rating is None:
            truth.append(None)
            continue
        ids = rollouts.response_ids[i]
        ranges = [(len(tokenizer.decode(ids[:a], skip_special_tokens=False)),
                   len(tokenizer.decode(ids[:b], skip_special_tokens=False))) for a, b in rating.spans]
        truth.append(rated_step_truth(prompt_texts[i], rollouts.texts[i], ranges))
    return truth


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
