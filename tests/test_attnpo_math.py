"""Hand-computed checks of attnpo_train.advantages (method page sections 5 and 6)."""

import math

import pytest
import torch

from attnpo_train.advantages import (
    attenuation_active,
    difficulty_baseline,
    group_accuracy,
    group_advantages,
    per_token_advantages,
    rescale_group,
    step_gammas,
)
from attnpo_train.config import TrainConfig

# --- group_advantages -----------------------------------------------------------------------------


def test_rloo_hand_computed():
    # rewards 1, 0, 0.5, 0.9 (sum 2.4); A_i = r_i - (2.4 - r_i) / 3
    #   A_0 = 1   - 1.4/3 =  0.533333
    #   A_1 = 0   - 2.4/3 = -0.8
    #   A_2 = 0.5 - 1.9/3 = -0.133333
    #   A_3 = 0.9 - 1.5/3 =  0.4
    got = group_advantages(torch.tensor([[1.0, 0.0, 0.5, 0.9]]), "rloo")
    assert got.shape == (1, 4)
    assert got[0].tolist() == pytest.approx([0.533333, -0.8, -0.133333, 0.4], abs=1e-6)


def test_rloo_rows_are_independent_groups():
    # second group all equal -> every advantage 0 ; first group 1, 0 -> +1, -1
    got = group_advantages(torch.tensor([[1.0, 0.0], [0.7, 0.7]]), "rloo")
    assert got.flatten().tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-6)


def test_grpo_uses_sample_std():
    # rewards 1, 1, 0, 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350
    # A = +-0.5 / 0.577350 = +-0.866025 (population std 0.5 would give +-1)
    got = group_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), "grpo", eps=0.0)
    assert got[0].tolist() == pytest.approx([0.866025, 0.866025, -0.866025, -0.866025], abs=1e-6)


def test_grpo_equal_rewards_give_zero():
    # all-correct group of equal lengths: every reward 1 - 0.2 * sigmoid(0) = 0.9 ; std 0 -> A = 0,
    # not the float32 rounding residue (~6e-8) divided by eps (~0.06)
    got = group_advantages(torch.tensor([[0.9, 0.9, 0.9]], dtype=torch.float32), "grpo")
    assert got.dtype == torch.float32
    assert got.abs().max().item() < 1e-6


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.ones(1, 4), "ppo")
    with pytest.raises(ValueError, match="size >= 2"):
        group_advantages(torch.ones(3, 1), "rloo")


def test_group_accuracy():
    correct = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert group_accuracy(correct).tolist() == [0.5, 1.0, 0.25]


# --- difficulty_baseline --------------------------------------------------------------------------


def test_difficulty_baseline_hand_computed():
    # p = 0.5: 0.5^2 * 0.05 = 0.0125 ; p = 1: 1 * 0.05 = 0.05 ; p = 0.5, alpha 1: 0.025
    p = torch.tensor([0.5, 1.0])
    got = difficulty_baseline(p, torch.tensor([0.05, 0.05]), alpha=2.0)
    assert got.tolist() == pytest.approx([0.0125, 0.05])
    got = difficulty_baseline(p[:1], torch.tensor([0.05]), alpha=1.0)
    assert got.tolist() == pytest.approx([0.025])


def test_difficulty_baseline_without_difficulty_takes_p_one():
    got = difficulty_baseline(torch.tensor([0.25]), torch.tensor([0.05]), use_difficulty=False)
    assert got.tolist() == pytest.approx([0.05])


def test_difficulty_baseline_validation():
    with pytest.raises(ValueError, match="bar must"):
        difficulty_baseline(torch.tensor([0.5]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="p must"):
        difficulty_baseline(torch.tensor([1.5]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="shape"):
        difficulty_baseline(torch.tensor([0.5, 0.5]), torch.tensor([0.1]))


# --- attenuation_active ---------------------------------------------------------------------------


def test_schedule_boundary_is_inclusive():
    # horizon 1000, p = 0.75 -> starts at step 1000 * 0.25 = 250
    p = torch.tensor([0.75])
    assert not attenuation_active(p, 249, 1000).item()
    assert attenuation_active(p, 250, 1000).item()


def test_schedule_easy_from_start_hard_never_within_horizon():
    p = torch.tensor([1.0, 0.5, 0.0])
    assert attenuation_active(p, 0, 1000).tolist() == [True, False, False]
    assert attenuation_active(p, 500, 1000).tolist() == [True, True, False]
    assert attenuation_active(p, 1000, 1000).tolist() == [True, True, True]


def test_schedule_absorbs_float_error_in_p():
    # float32(0.7) = 0.699999988 -> 1000 * (1 - p) = 300.000012, yet step 300 has reached it
    p = torch.tensor([0.7], dtype=torch.float32)
    assert attenuation_active(p, 300, 1000).item()
    assert not attenuation_active(p, 299, 1000).item()


def test_schedule_horizon_zero_is_always_active():
    assert attenuation_active(torch.tensor([0.125]), 0, 0).item()


# --- step_gammas ----------------------------------------------------------------------------------

SCORES = torch.tensor([0.02, 0.1, 0.3])  # below, equal to, above the baseline 0.1
BASE = 0.1


def test_pos_attenuation_easy_prompt():
    # p = 1: gamma_0 = 1 * 0.02/0.1 + 0 = 0.2 ; step 1 (S = S_base) and step 2 (above) keep 1
    got = step_gammas(SCORES, BASE, advantage=1.0, p=1.0, active=True)
    assert got.tolist() == pytest.approx([0.2, 1.0, 1.0])


def test_pos_attenuation_scales_with_difficulty():
    # p = 0.5: p^2 = 0.25 -> gamma_0 = 0.25 * 0.2 + 0.75 = 0.8
    # p = 0.125: p^2 = 0.015625 -> gamma_0 = 0.015625 * 0.2 + 0.984375 = 0.9875
    medium = step_gammas(SCORES, BASE, advantage=1.0, p=0.5, active=True)
    hard = step_gammas(SCORES, BASE, advantage=1.0, p=0.125, active=True)
    assert medium[0].item() == pytest.approx(0.8)
    assert hard[0].item() == pytest.approx(0.9875)
    # beta = 1: p = 0.5 -> 0.5 * 0.2 + 0.5 = 0.6
    assert step_gammas(SCORES, BASE, 1.0, 0.5, True, beta=1.0)[0].item() == pytest.approx(0.6)


def test_pos_attenuation_floor_delta():
    # p = 1, delta = 0.5: (1 - 0.5) * 0.2 + 0.5 = 0.6 ; a zero score gives exactly delta
    got = step_gammas(torch.tensor([0.02, 0.0]), BASE, 1.0, 1.0, True, delta=0.5)
    assert got.tolist() == pytest.approx([0.6, 0.5])


def test_pos_attenuation_waits_for_schedule_and_switch():
    assert step_gammas(SCORES, BASE, 1.0, 1.0, active=False).tolist() == [1.0, 1.0, 1.0]
    assert step_gammas(SCORES, BASE, 1.0, 1.0, True, pos_attenuation=False).tolist() == [1.0, 1.0, 1.0]


def test_pos_attenuation_without_difficulty_takes_p_one():
    # p = 0.5 would give 0.8; use_difficulty=False -> 0.02 / 0.1 = 0.2
    got = step_gammas(SCORES, BASE, 1.0, 0.5, True, use_difficulty=False)
    assert got[0].item() == pytest.approx(0.2)


def test_neg_attenuation_zeroes_high_score_steps():
    # A < 0: steps with S > S_base (only step 2) get 0; equality keeps 1
    got = step_gammas(SCORES, BASE, advantage=-1.0, p=0.5, active=True)
    assert got.tolist() == [1.0, 1.0, 0.0]


def test_neg_attenuation_is_not_scheduled_but_can_be_switched_off():
    assert step_gammas(SCORES, BASE, -1.0, 0.5, active=False).tolist() == [1.0, 1.0, 0.0]
    assert step_gammas(SCORES, BASE, -1.0, 0.5, True, neg_attenuation=False).tolist() == [1.0, 1.0, 1.0]


def test_zero_advantage_keeps_gamma_one():
    assert step_gammas(SCORES, BASE, 0.0, 1.0, True).tolist() == [1.0, 1.0, 1.0]


def test_step_gammas_validation():
    with pytest.raises(ValueError, match="baseline"):
        step_gammas(SCORES, 0.0, 1.0, 1.0, True)
    with pytest.raises(ValueError, match="delta"):
        step_gammas(SCORES, BASE, 1.0, 1.0, True, delta=2.0)
    with pytest.raises(ValueError, match="shape"):
        step_gammas(torch.ones(2, 2), BASE, 1.0, 1.0, True)


# --- per_token_advantages -------------------------------------------------------------------------


def test_tokens_after_the_marker_keep_gamma_one():
    # 10 response tokens: steps [0,3) and [3,6), marker at 6, answer 7..9
    # A = 2, gammas 0.5, 0 -> 1, 1, 1, 0, 0, 0 | 2, 2, 2, 2
    got = per_token_advantages(2.0, 10, [(0, 3), (3, 6)], torch.tensor([0.5, 0.0]))
    assert got.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]


def test_tokens_in_no_step_keep_gamma_one():
    # gap tokens 0 and 3 are in no step: A = -1 -> -1 ; steps get gamma 0.25 -> -0.25
    got = per_token_advantages(-1.0, 6, [(1, 3), (4, 6)], torch.tensor([0.25, 0.25]))
    assert got.tolist() == [-1.0, -0.25, -0.25, -1.0, -0.25, -0.25]


@pytest.mark.parametrize(
    "spans, gammas, message",
    [
        ([(0, 3), (2, 5)], [1.0, 1.0], "overlaps"),
        ([(0, 3), (3, 11)], [1.0, 1.0], "outside"),
        ([(2, 2)], [1.0], "empty"),
        ([(0, 3)], [1.0, 1.0], "one gamma per step"),
    ],
)
def test_per_token_advantages_validation(spans, gammas, message):
    with pytest.raises(ValueError, match=message):
        per_token_advantages(1.0, 10, spans, torch.tensor(gammas))


# --- rescale_group --------------------------------------------------------------------------------


def _group(step: int, config: TrainConfig = TrainConfig()):
    # G = 4, p = 0.75, prompt 10 tokens; defaults alpha = beta = 2, delta = 0, horizon 1000.
    # response 0: correct, A = +0.5, 10 tokens, steps [0,4) [4,8), marker 8, answer token 9:
    #   |F| = 1, |o| = 20 -> S_base = 0.75^2 / 20 = 0.028125 ; scores 0.01 (below), 0.5 (above)
    #   gamma_0 = 0.5625 * 0.01/0.028125 + 0.4375 = 0.5625 * 0.355556 + 0.4375 = 0.2 + 0.4375 = 0.6375
    # response 1: correct, A = -0.3, 8 tokens, steps [0,2) [2,5) [5,6), |F| = 1, |o| = 18:
    #   S_base = 0.5625 / 18 = 0.03125 ; scores 0.5 (above -> 0), 0.01, 0.02 (below -> 1)
    # response 2: correct but a single step -> untouched
    # response 3: incorrect -> untouched even though it has steps and scores
    return rescale_group(
        [True, True, True, False],
        torch.tensor([0.5, -0.3, 0.2, -0.4]),
        step_scores=[
            torch.tensor([0.01, 0.5]),
            torch.tensor([0.5, 0.01, 0.02]),
            torch.tensor([0.001]),
            torch.tensor([0.0, 0.0]),
        ],
        step_spans=[[(0, 4), (4, 8)], [(0, 2), (2, 5), (5, 6)], [(0, 5)], [(0, 2), (2, 4)]],
        bars=[1 / 20, 1 / 18, 1 / 16, 1 / 15],
        response_lens=[10, 8, 6, 5],
        p=0.75,
        step=step,
        config=config,
    )


def test_rescale_group_hand_computed_at_schedule_start():
    # schedule: 1000 * (1 - 0.75) = 250, so step 250 is active
    out, stats = _group(step=250)
    assert out[0].tolist() == pytest.approx([0.5 * 0.6375] * 4 + [0.5] * 6)
    assert out[1].tolist() == pytest.approx([0.0, 0.0] + [-0.3] * 6)
    assert out[2].tolist() == pytest.approx([0.2] * 6)  # single step: uniform
    assert out[3].tolist() == pytest.approx([-0.4] * 5)  # incorrect: uniform
    # steps of rescaled responses: 2 + 3 = 5 ; attenuated: one in each ; gammas 0.6375, 1, 0, 1, 1
    assert stats["rescaled_responses"] == 2
    assert stats["steps"] == 5
    assert stats["attenuated_steps"] == 2
    assert stats["frac_attenuated"] == pytest.approx(0.4)
    assert stats["mean_gamma"] == pytest.approx(3.6375 / 5)


def test_rescale_group_before_schedule_only_neg_attenuation():
    out, stats = _group(step=249)
    assert out[0].tolist() == pytest.approx([0.5] * 10)
    assert out[1].tolist() == pytest.approx([0.0, 0.0] + [-0.3] * 6)
    assert stats["attenuated_steps"] == 1


def test_rescale_group_without_difficulty():
    # S_base = 1/20 = 0.05 ; gamma_0 = 0.01 / 0.05 = 0.2 -> 0.5 * 0.2 = 0.1
    out, _ = _group(step=250, config=TrainConfig(use_difficulty=False))
    assert out[0][:4].tolist() == pytest.approx([0.1] * 4)


def test_rescale_group_all_incorrect_is_untouched():
    out, stats = rescale_group(
        [False, False],
        [0.0, 0.0],
        step_scores=[None, None],
        step_spans=[None, None],
        bars=[1 / 5, 1 / 6],
        response_lens=[3, 4],
        p=0.0,
        step=0,
        config=TrainConfig(),
    )
    assert [t.tolist() for t in out] == [[0.0] * 3, [0.0] * 4]
    assert stats == {
        "rescaled_responses": 0.0,
        "steps": 0.0,
        "attenuated_steps": 0.0,
        "frac_attenuated": 0.0,
        "mean_gamma": 1.0,
        "gammas": [None, None],
    }


def test_rescale_group_validation():
    kwargs = dict(
        step_spans=[[(0, 1), (1, 2)], None],
        bars=[1 / 5, 1 / 5],
        response_lens=[3, 3],
        p=0.5,
        step=0,
        config=TrainConfig(),
    )
    with pytest.raises(ValueError, match="response 0 is correct with 2 steps but has None"):
        rescale_group([True, False], [1.0, -1.0], step_scores=[None, None], **kwargs)
    with pytest.raises(ValueError, match="G = 2"):
        rescale_group([True, False], [1.0, -1.0, 0.0], step_scores=[None, None], **kwargs)
    kwargs["p"] = 0.0
    with pytest.raises(ValueError, match="p must"):
        rescale_group([True, False], [1.0, -1.0], step_scores=[torch.ones(2), None], **kwargs)


def test_rescale_group_gamma_bounds_random():
    # property: every rescaled token advantage lies between 0 and A (gamma in [0, 1])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.rand(4, generator=gen) * 0.1
        sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
        out, _ = rescale_group(
            [True, True],
            [sign * 0.7, 0.1],
            step_scores=[scores, None],
            step_spans=[[(0, 2), (2, 4), (4, 6), (6, 8)], None],
            bars=[2 / 30, 1 / 30],
            response_lens=[10, 4],
            p=1.0,
            step=0,
            config=TrainConfig(),
        )
        gammas = out[0] / (sign * 0.7)
        assert ((gammas >= 0) & (gammas <= 1 + 1e-6)).all()
        assert not math.isnan(gammas.sum().item())
