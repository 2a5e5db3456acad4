"""Checks of the distillation objective on hand-computed cases: the fixed layer map, the Mixture-of-Layers
weights and targets, the transfer loss, the shuffled-steps control."""

from __future__ import annotations

import math

import pytest
import torch

from attnpo_train.distill.objective import (
    MixtureOfLayers, fixed_layer_map, fixed_layer_weights, layer_targets, shuffled_steps, transfer_loss,
)


@pytest.mark.parametrize("student, teacher, expected", [(2, 4, [1, 3]), (3, 4, [1, 2, 3]), (4, 4, [0, 1, 2, 3]),
                                                         (1, 4, [3])])
def test_fixed_map_follows_the_last_layer_of_each_block(student, teacher, expected):
    assert fixed_layer_map(student, teacher) == expected
    weights = fixed_layer_weights(student, teacher)
    assert weights.sum(dim=1).tolist() == [1.0] * student
    assert weights.argmax(dim=1).tolist() == expected


def test_mixture_starts_uniform_and_is_a_softmax_of_its_logits():
    mixture = MixtureOfLayers(2, 4)
    assert torch.allclose(mixture.weights(), torch.full((2, 4), 0.25))
    with torch.no_grad():
        mixture.logits[0] = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])
    assert torch.allclose(mixture.weights()[0], torch.tensor([1 / 6, 3 / 6, 1 / 6, 1 / 6]))


def test_layer_targets_mix_the_teacher_layers_per_student_layer():
    teacher = torch.tensor([[[[0.5, 0.5]], [[0.1, 0.9]]]])  # [batch 1, teacher layer 2, step 1, key+1 2]
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    expected = torch.tensor([[[[0.2, 0.8]], [[0.5, 0.5]]]])
    assert torch.allclose(layer_targets(weights, teacher), expected)


def test_transfer_loss_is_the_mean_kl_over_valid_steps_and_layers():
    target = torch.tensor([[[[0.5, 0.5], [0.3, 0.7]]]])  # [batch 1, layer 1, step 2, key+1 2]
    student = torch.tensor([[[[0.25, 0.75], [0.9, 0.1]]]])
    kl_step0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    only_first = transfer_loss(student, target, torch.tensor([[True, False]]))  # step 1 is padding
    assert only_first.item() == pytest.approx(kl_step0, rel=1e-6)
    kl_step1 = 0.3 * math.log(0.3 / 0.9) + 0.7 * math.log(0.7 / 0.1)
    both = transfer_loss(student, target, torch.tensor([[True, True]]))
    assert both.item() == pytest.approx((kl_step0 + kl_step1) / 2, rel=1e-6)
    assert transfer_loss(target, target, torch.tensor([[True, True]])).item() == pytest.approx(0.0, abs=1e-7)


def test_transfer_loss_moves_the_mixture_towards_the_layer_the_student_matches():
    mixture = MixtureOfLayers(1, 2)
    teacher = torch.tensor([[[[0.9, 0.1]], [[0.2, 0.8]]]])
    student = torch.tensor([[[[0.2, 0.8]]]])  # equal to teacher layer 1
    loss = transfer_loss(student, layer_targets(mixture.weights(), teacher), torch.tensor([[True]]))
    loss.backward()
    assert mixture.logits.grad[0, 1] < 0 < mixture.logits.grad[0, 0]


def test_shuffled_steps_permute_the_steps_alike_in_every_layer():
    mass = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [layer, step, key]
    shuffled = shuffled_steps(mass, torch.Generator().manual_seed(1))
    order = [int(row[0]) // 3 for row in shuffled[0]]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert torch.equal(shuffled[1], mass[1][order])
    again = shuffled_steps(mass, torch.Generator().manual_seed(1))
    assert torch.equal(shuffled, again)
