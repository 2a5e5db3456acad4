"""Evaluation of a policy the way the papers report it: greedy, and avg@K over sampled responses; mean
response length; ground-truth step accounting where the organism's labeler can read the responses; and
two efficiency scores against a base model.

**avg@K** (AttnPO evaluates at temperature 0.6, top-p 0.95, K = 16 on AIME, 4 on MATH/GSM8K): K sampled
responses per problem; accuracy is the mean over all responses (each problem's mean correctness,
averaged), tokens the mean over all responses.

**efficiency** (this project's; the paper's two headline numbers with equal weight)::

    efficiency = length_reduction + accuracy_change_points / 100
    length_reduction       = (L_base - L) / L_base          (fraction of the base's mean tokens saved)
    accuracy_change_points = 100 * (acc - acc_base)        (percentage points)

**AES** (O1-Pruner's Accuracy-Efficiency Score, published weights 3 and 5)::

    dL = (L_base - L) / L_base,  dA = (A - A_base) / A_base
    AES = dL + 3 dA   if dA >= 0,   dL - 5 |dA|   otherwise

(other papers weight 1, 5, 10: the output states the weights). AES is relative to the base's accuracy,
so it is undefined (None) for a base at 0% accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from attnpo_train.data import Prompt
from attnpo_train.truth import mean_accounting, step_accounting
from kfh_probe import generate_rollouts, is_correct

AES_WEIGHTS = {"gain": 3.0, "loss": 5.0}
"""O1-Pruner's AES weights: accuracy gains count 3x, losses 5x (relative to the base's accuracy)."""


def evaluate(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int = 16,
    marker: str = "</think>",
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    grader: str = "math-verify",
) -> dict:
    """Accuracy and response length of ``model`` on ``prompts``: greedy (``temperature`` None, then
    ``samples`` must be 1) or avg@``samples`` at ``temperature`` / ``top_p``, seeded with ``seed``.

    A response that reaches ``max_new_tokens`` without EOS counts as incorrect (as in training). The
    global torch RNG is left as it was. ``grader``: ``"math-verify"`` or ``"exact"`` (``attnpo_train.rewards``).

    Returns:
        {"n" (problems), "samples", "temperature" (None for greedy), "top_p", "accuracy" (fraction, avg@K),
         "response_tokens_mean" (EOS included), "truncated_frac"} and, when the organism's labeler can
         read any response, "steps": means per readable response of essential / redundant steps, each
         redundancy kind, missing essential steps, and "labelled_fraction"
         (``attnpo_train.truth.mean_accounting``). "steps" is absent, not zero, for other data.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    if temperature is None and samples != 1:
        raise ValueError("greedy evaluation gives one response per problem: pass a temperature with samples > 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollouts = generate_rollouts(model, tokenizer, [p.text for p in prompts], samples, max_new_tokens, temperature,
                                     batch_size=batch_size, top_p=top_p)
    rows = [(prompts[i // samples], text, done) for i, (text, done) in enumerate(zip(rollouts.texts, rollouts.finished))]
    correct = [done and is_correct(text, prompt.answer, marker, grader) for prompt, text, done in rows]
    total = len(rows)
    result = {
        "n": len(prompts),
        "samples": samples,
        "temperature": temperature,
        "top_p": top_p if temperature is not None else None,
        "accuracy": sum(correct) / total,
        "response_tokens_mean": float(rollouts.response_lengths.mean()),
        "truncated_frac": sum(not done for _, _, done in rows) / total,
    }
    steps = mean_accounting([step_accounting(prompt.text, text) for prompt, text, _ in rows])
    if steps is not None:
        result["steps"] = steps
    return result


def efficiency(result: dict, base: dict) -> dict:
    """Both efficiency scores of ``result`` against ``base`` (both from ``evaluate``); see the module
    docstring.

    Returns:
        {"length_reduction", "accuracy_change_points", "efficiency", "aes" (None when the base's
         accuracy is 0), "aes_weights"}.
    """
    if base["response_tokens_mean"] <= 0:
        raise ValueError("the base model's mean response length is 0; the length reduction is undefined")
    length_reduction = (base["response_tokens_mean"] - result["response_tokens_mean"]) / base["response_tokens_mean"]
    accuracy_change_points = 100.0 * (result["accuracy"] - base["accuracy"])
    return {
        "length_reduction": length_reduction,
        "accuracy_change_points": accuracy_change_points,
        "efficiency": length_reduction + accuracy_change_points / 100.0,
        "aes": aes(length_reduction, result["accuracy"], base["accuracy"]),
        "aes_weights": dict(AES_WEIGHTS),
    }


def aes(length_reduction: float, accuracy: float, base_accuracy: float) -> float | None:
    """O1-Pruner's AES: dL + 3 dA when dA >= 0, else dL - 5 |dA|, with dA relative to the base's
    accuracy (None when that is 0)."""
    if base_accuracy <= 0:
        return None
    relative = (accuracy - base_accuracy) / base_accuracy
    weight = AES_WEIGHTS["gain"] if relative >= 0 else AES_WEIGHTS["loss"]
    return length_reduction + weight * relative  # for dA < 0 this is dL - 5 |dA|
