"""Greedy evaluation of a policy: accuracy, mean response length, and an efficiency score against a base.

The efficiency score follows how the AttnPO paper reports its results ("-61% length, +7.3 points of
accuracy"): the two headline numbers, added with equal weight,

    efficiency = length_reduction + accuracy_change_points / 100
    length_reduction       = (L_base - L) / L_base          (fraction of the base's mean tokens saved)
    accuracy_change_points = 100 * (acc - acc_base)        (percentage points)

so one point of accuracy is worth one percent of length. It is 0 for the base model itself, positive
when a model is better on balance, and never hides a trade-off: both components are reported beside
it. Accuracy enters as a difference in points, not relative to the base, so a base near 0% accuracy
cannot inflate it.
"""

from __future__ import annotations

from torch import nn

from attnpo_train.data import Prompt
from attnpo_train.rewards import correctness
from attnpo_train.rollouts import generate_rollouts


def evaluate(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int = 16,
    marker: str = "</think>",
) -> dict[str, float]:
    """Greedy accuracy and response length of ``model`` on ``prompts``.

    A response that reaches ``max_new_tokens`` without EOS counts as incorrect (as in training).

    Returns:
        {"n", "accuracy" (fraction), "response_tokens_mean" (EOS included), "truncated_frac"}.
    """
    rollouts = generate_rollouts(model, tokenizer, prompts, 1, max_new_tokens, None, batch_size=batch_size)
    correct = [
        bool(done) and bool(correctness([text], prompt.answer, marker)[0])
        for prompt, text, done in zip(prompts, rollouts.texts, rollouts.finished)
    ]
    n = len(prompts)
    return {
        "n": n,
        "accuracy": sum(correct) / n,
        "response_tokens_mean": float(rollouts.response_lengths.mean()),
        "truncated_frac": sum(not done for done in rollouts.finished) / n,
    }


def efficiency(result: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Efficiency of ``result`` against ``base`` (both from ``evaluate``); see the module docstring.

    Returns:
        {"length_reduction", "accuracy_change_points", "efficiency"}.
    """
    if base["response_tokens_mean"] <= 0:
        raise ValueError("the base model's mean response length is 0; the length reduction is undefined")
    length_reduction = (base["response_tokens_mean"] - result["response_tokens_mean"]) / base["response_tokens_mean"]
    accuracy_change_points = 100.0 * (result["accuracy"] - base["accuracy"])
    return {
        "length_reduction": length_reduction,
        "accuracy_change_points": accuracy_change_points,
        "efficiency": length_reduction + accuracy_change_points / 100.0,
    }
