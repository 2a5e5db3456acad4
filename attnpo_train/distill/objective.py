"""The mathematics of attention-guided distillation, as pure functions (docs/method.md, section 10).

Notation: L_T teacher layers, L_S student layers, K steps (reasoning steps, then F), J key spans; a key
distribution has J + 1 entries (the available spans' mass, then the rest; ``kfh_probe.key_information``).

- **Layer targets.** Student layer m is trained towards a mixture of the teacher's layers'
  distributions, ``target_m = sum_l w[m, l] p_teacher_l``, with ``w[m] = softmax(theta[m])`` learned
  (:class:`MixtureOfLayers`, ``theta`` starts at 0: the uniform mixture), or the one-hot rows of
  :func:`fixed_layer_map` (the ablation). A mixture of distributions is a distribution.
- **Transfer loss.** The mean over valid (trace, step) pairs and student layers of
  ``KL(target || p_student) = sum_j target_j (log target_j - log p_student_j)``.
- **Objective.** ``cross_entropy + transfer_weight * transfer_loss``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-12
"""Floor of probabilities inside the logarithms of the KL."""


def fixed_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer follows in the fixed map: ``ceil((m + 1) L_T / L_S) - 1``
    (the last layer of each of L_S equal blocks of the teacher: 2 of 4 -> [1, 3])."""
    return [math.ceil((m + 1) * teacher_layers / student_layers) - 1 for m in range(student_layers)]


def fixed_layer_weights(student_layers: int, teacher_layers: int) -> torch.Tensor:
    """``[student_layer, teacher_layer]`` one-hot rows of :func:`fixed_layer_map`."""
    weights = torch.zeros(student_layers, teacher_layers)
    weights[torch.arange(student_layers), torch.tensor(fixed_layer_map(student_layers, teacher_layers))] = 1.0
    return weights


class MixtureOfLayers(nn.Module):
    """Learnable ``[student_layer, teacher_layer]`` weights, each row a softmax of its own logits (zeros at
    the start: every teacher layer weighs 1 / L_T)."""

    def __init__(self, student_layers: int, teacher_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(student_layers, teacher_layers))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)


def layer_targets(weights: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per student layer, the weighted mixture of the teacher layers' distributions.

    Args:
        weights: ``[student_layer, teacher_layer]``, rows summing to 1.
        teacher: ``[batch, teacher_layer, step, key + 1]``.
    Returns:
        ``[batch, student_layer, step, key + 1]``.
    """
    return torch.einsum("st,btkj->bskj", weights, teacher)


def transfer_loss(student: torch.Tensor, target: torch.Tensor, step_valid: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(target || student)`` over valid steps of every trace and over student layers.

    Args:
        student, target: ``[batch, student_layer, step, key + 1]`` distributions.
        step_valid: ``[batch, step]`` bool (False on padding steps).
    """
    kl = (target * (target.clamp_min(EPS).log() - student.clamp_min(EPS).log())).sum(dim=-1)  # [batch, layer, step]
    valid = step_valid[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * valid).sum() / valid.sum().clamp_min(1.0)


def shuffled_steps(mass: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The control: ``mass [layer, step, key]`` with its steps permuted (one permutation for all layers)."""
    return mass[:, torch.randperm(mass.shape[1], generator=generator)]
