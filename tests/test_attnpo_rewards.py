"""Hand-computed checks of attnpo_train.rewards (method page section 5). Answer extraction and matching
are the probe's (``kfh_probe.grading``), checked in test_grading.py."""

import math

import pytest
import torch

from attnpo_train.rewards import correctness, length_penalised_rewards


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- correctness ----------------------------------------------------------------------------------


def test_correctness_vector():
    responses = [
        "think</think>\\boxed{12}",  # correct
        "think</think>\\boxed{13}",  # wrong answer
        "think \\boxed{12}",  # no marker
        "a</think>b</think>\\boxed{12}",  # two markers
        "think</think>\\boxed{+12}.",  # correct after normalisation
    ]
    got = correctness(responses, "12")
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


# --- length_penalised_rewards ---------------------------------------------------------------------


def test_length_penalty_hand_computed():
    # correct lengths 100, 200, 300: mu = 200, population sigma = sqrt((100^2 + 0 + 100^2) / 3)
    #   = sqrt(20000 / 3) = 81.6497 ; z = -1.224745, 0, +1.224745
    # r = 1 - 0.2 * sigmoid(z): sigmoid(-1.224745) = 0.227103 -> 0.954579 ; 0.5 -> 0.9 ;
    #   sigmoid(1.224745) = 0.772897 -> 0.845421 ; the incorrect response (length 50) gets 0.
    correct = torch.tensor([True, True, True, False])
    lengths = torch.tensor([100, 200, 300, 50])
    got = length_penalised_rewards(correct, lengths, alpha_len=0.2)
    sigma = math.sqrt(20000 / 3)
    expected = [1 - 0.2 * sigmoid(-100 / sigma), 0.9, 1 - 0.2 * sigmoid(100 / sigma), 0.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[0].item() == pytest.approx(0.954579, abs=1e-6)
    assert got[2].item() == pytest.approx(0.845421, abs=1e-6)


def test_length_penalty_uses_population_not_sample_std():
    # two correct lengths 10 and 30: population sigma = 10 (sample sigma would be 14.14)
    # z = -1 and +1 -> r = 1 - 0.2 * sigmoid(-1) = 0.946212, 1 - 0.2 * sigmoid(1) = 0.853788
    got = length_penalised_rewards(torch.tensor([1.0, 1.0]), torch.tensor([10, 30]))
    assert got.tolist() == pytest.approx([0.946212, 0.853788], abs=1e-6)


def test_length_penalty_single_correct_response_gets_half_penalty():
    # sigma = 0, L = mu: sigmoid(0 / 1e-8) = 0.5 -> r = 1 - 0.2 * 0.5 = 0.9
    got = length_penalised_rewards(torch.tensor([0, 1, 0]), torch.tensor([5, 500, 7]))
    assert got.tolist() == pytest.approx([0.0, 0.9, 0.0])


def test_length_penalty_no_correct_response_is_all_zero():
    got = length_penalised_rewards(torch.zeros(4), torch.tensor([1, 2, 3, 4]))
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_length_penalty_validates_inputs():
    with pytest.raises(ValueError, match="shape"):
        length_penalised_rewards(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="alpha_len"):
        length_penalised_rewards(torch.ones(2), torch.ones(2), alpha_len=1.5)
