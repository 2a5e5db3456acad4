"""Outcome rewards: correctness and the length-penalised reward.

Method page (docs/method.md), section 5; paper: "AttnPO" (arXiv 2602.09953). The reward is the
TLMRE form the authors' code uses: a correct response earns 1 minus a length penalty that depends on
where its length sits among the group's correct responses; an incorrect response earns 0.

Whether a response is correct is the probe's rule (``kfh_probe.is_correct``: the last ``\\boxed{}`` after
the marker, compared with the ``"math-verify"`` or ``"exact"`` grader), so probe and trainer grade alike.
``rollout_correctness`` and ``tlmre_rewards`` apply the two rules to a training step's rollouts.
"""

from collections.abc import Sequence

import torch

from attnpo_train.config import TrainConfig
from kfh_probe import Rollouts, is_correct, resolve_grader


def correctness(
    responses: Sequence[str], reference: str, marker: str = "</think>", grader: str = "math-verify"
) -> torch.Tensor:
    """0/1 correctness of each response of one group against the reference answer.

    Args:
        responses: the G decoded responses of one prompt.
        reference: the reference final answer.
        marker: the end-of-thinking marker.
        grader: ``"math-verify"`` or ``"exact"`` (``kfh_probe.grading``).
    Returns:
        float32 tensor [G]: 1.0 where ``kfh_probe.grading.is_correct``, else 0.0 (no ``\\boxed{}``
        answer after the marker: 0.0).
    """
    return torch.tensor([float(is_correct(r, reference, marker, grader)) for r in responses], dtype=torch.float32)


def length_penalised_rewards(
    correct: torch.Tensor, lengths: torch.Tensor, alpha_len: float = 0.2
) -> torch.Tensor:
    """TLMRE length-penalised reward of one group (method page section 5).

        r_i = 1[correct_i] * (1 - alpha_len * sigmoid((L_i - mu_c) / (sigma_c + 1e-8)))

    mu_c and sigma_c are the mean and the *population* standard deviation (divide by n, as the authors'
    code does) of the lengths of the group's correct responses. Incorrect responses get 0, and a group
    with no correct response is all zeros. With a single correct response sigma_c = 0 and L_i = mu_c, so
    sigmoid(0) = 0.5 and its reward is 1 - alpha_len / 2 (the same value as a correct response of exactly
    average length in a larger group).

    Args:
        correct: [G] bool or 0/1 float, correctness of each response.
        lengths: [G] response lengths in tokens.
        alpha_len: penalty strength in [0, 1] (0.2 in the reference); rewards of correct responses lie
            in (1 - alpha_len, 1).
    Returns:
        float32 tensor [G].
    """
    correct = torch.as_tensor(correct)
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if correct.ndim != 1 or correct.shape != lengths.shape:
        raise ValueError(
            f"correct and lengths must both have shape [G]; got {tuple(correct.shape)} and {tuple(lengths.shape)}"
        )
    if not 0.0 <= alpha_len <= 1.0:
        raise ValueError(f"alpha_len must be in [0, 1]; got {alpha_len}")
    is_correct = correct.bool()
    rewards = torch.zeros_like(lengths)
    if not is_correct.any():
        return rewards
    correct_lengths = lengths[is_correct]
    mu = correct_lengths.mean()
    sigma = correct_lengths.std(correction=0)
    penalty = alpha_len * torch.sigmoid((correct_lengths - mu) / (sigma + 1e-8))
    rewards[is_correct] = 1.0 - penalty
    return rewards


def rollout_correctness(rollouts: Rollouts, answers: Sequence[str], config: TrainConfig) -> torch.Tensor:
    """[P, G] float32 0/1 correctness of a step's rollouts: the boxed answer after ``config.marker`` matches the
    prompt's reference ``answers[p]`` (``config.grader``; "auto": exact on the organism's task) and the response
    ended with EOS (one cut at ``max_new_tokens`` is incorrect)."""
    g = rollouts.group_size
    grader = resolve_grader(config.grader, organism=config.data is None)
    finished = torch.tensor(rollouts.finished, dtype=torch.float32).view(len(answers), g)
    return torch.stack(
        [correctness(rollouts.texts[i * g : (i + 1) * g], a, config.marker, grader) for i, a in enumerate(answers)]
    ) * finished


def tlmre_rewards(correct: torch.Tensor, rollouts: Rollouts, alpha_len: float) -> torch.Tensor:
    """[P, G] float32 ``length_penalised_rewards`` of every group of a step's rollouts (``correct`` [P, G])."""
    lengths = rollouts.response_lengths.view(correct.shape)
    return torch.stack([length_penalised_rewards(correct[i], lengths[i], alpha_len) for i in range(len(correct))])
