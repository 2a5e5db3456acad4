"""The Preplan-and-Anchor credit strategies (attnpo_train.strategies.preplan_anchor): hand-computed masks and amplification, the
loop's advantages against the signals of eager attention, two training steps of each method."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    R1_TRACES, SHORT_55, WRONG_54, crafted_rollouts, eager_maps, rhythm_reference, separate_advantages, small_config,
)

from attnpo_train import loop
from attnpo_train.config import TrainConfig
from attnpo_train.data import Prompt, PromptSource
from attnpo_train.strategies import CreditBatch, strategy_class
from attnpo_train.strategies.preplan_anchor import (
    PaperRule,
    amplify,
    paper_gamma,
    rhythm_advantages,
    token_mask,
    top_share,
    waad_change,
    waad_rise,
)
from kfh_probe.preplan_anchor import RhythmSignals

NAN = float("nan")


def test_waad_rise_is_the_difference_to_the_previous_token():
    assert torch.equal(waad_rise(torch.tensor([1.0, 4.0, 2.0, 2.5])).nan_to_num(-9), torch.tensor([-9.0, 3.0, -2.0, 0.5]))


def test_top_share_takes_ceil_of_the_defined_scores_with_ties_by_position():
    scores = torch.tensor([0.2, NAN, 0.9, 0.2, 0.5, 0.2])  # 5 defined: ceil(0.4 * 5) = 2
    assert top_share(scores, 0.4).tolist() == [False, False, True, False, True, False]
    # ceil(0.6 * 5) = 3: the third place is a tie of three 0.2s; the earliest wins.
    assert top_share(scores, 0.6).tolist() == [True, False, True, False, True, False]
    assert not top_share(torch.tensor([NAN, NAN]), 0.4).any()


WAAD = torch.tensor([5.0, 1.0, 8.0, 2.0, 9.0, 9.5])  # rises: -, -4, 7, -6, 7, 0.5 -> top 2 of 5: t = 2, 4
FAI = torch.tensor([0.1, 0.6, 0.0, 0.2, 0.9, NAN])  # top 2 of 5: s = 4, 1


def test_preplan_marks_the_sharpest_waad_rises():
    assert token_mask("preplan", WAAD, FAI).nonzero().flatten().tolist() == [2, 4]


def test_anchor_marks_the_largest_fai():
    assert token_mask("anchor", WAAD, FAI).nonzero().flatten().tolist() == [1, 4]


def test_coupled_marks_anchors_at_or_right_after_a_preplan_token_and_those_preplan_tokens():
    # Anchor 4 coincides with preplan 4; anchor 1 has no preplan at 0 or 1; preplan 2 has no anchor at 2 or 3.
    assert token_mask("coupled", WAAD, FAI).nonzero().flatten().tolist() == [4]
    fai = torch.tensor([0.1, 0.0, 0.0, 0.9, 0.0, NAN])  # anchor 3 right after preplan 2 -> both
    assert token_mask("coupled", WAAD, fai, top=0.2).nonzero().flatten().tolist() == [2, 3]


def test_amplify_multiplies_only_non_negative_advantages_on_the_mask():
    mask = torch.tensor([True, False, True])
    assert amplify(0.5, mask).tolist() == [0.75, 0.5, 0.75]
    assert amplify(-0.5, mask).tolist() == [-0.5, -0.5, -0.5]
    assert amplify(0.0, mask, gain=2.0).tolist() == [0.0, 0.0, 0.0]


def test_rhythm_advantages_need_signals_only_for_positive_advantages():
    from kfh_probe.sampling import Rollouts

    rollouts = Rollouts(2, [[1], [1]], [[5] * 6, [6] * 3], ["", ""], [True, True])
    advantages = torch.tensor([[0.4, -0.4]])
    out, stats = rhythm_advantages(advantages, rollouts, {0: RhythmSignals(1, WAAD, FAI)}, "anchor", 0.4, 1.5)
    assert torch.allclose(out[0], torch.tensor([0.4, 0.6, 0.4, 0.4, 0.6, 0.4]))
    assert torch.equal(out[1], torch.full((3,), -0.4))
    assert stats["amplified_frac"] == pytest.approx(2 / 6)
    assert stats["masks"][1] is None
    with pytest.raises(ValueError, match="rollout 0 has a positive advantage"):
        rhythm_advantages(advantages, rollouts, {}, "anchor", 0.4, 1.5)
    with pytest.raises(ValueError, match="strategy must be one of"):
        token_mask("sideways", WAAD, FAI)


@pytest.mark.parametrize("strategy", ["preplan", "anchor", "coupled"])
def test_loop_advantages_equal_the_strategy_on_eager_attention_signals(strategy, tiny_model_dir, byte_tokenizer,
                                                                      rhythm_file):
    from kfh_probe.loading import load_model

    model = load_model(tiny_model_dir)
    credit = strategy_class(strategy)(TrainConfig(method=strategy, rhythm=str(rhythm_file)))
    credit.attach(model, byte_tokenizer)
    rollouts = crafted_rollouts(byte_tokenizer, [R1_TRACES[0]["response"], SHORT_55, WRONG_54], R1_TRACES[0]["prompt"])
    advantages = torch.tensor([[0.5, 0.8, -1.3]])
    out, metrics = separate_advantages(credit, model, CreditBatch(rollouts, torch.ones(1, 3), advantages, 0), 0, 2)
    _, stats = rhythm_advantages(advantages, rollouts, credit.readings, strategy, 0.4, 1.5)
    assert metrics["amplified_frac"] == stats["amplified_frac"]
    for i in range(2):
        sequence = rollouts.prompt_ids[i] + rollouts.response_ids[i]
        _, waad, fai = rhythm_reference(eager_maps(model, sequence), len(rollouts.prompt_ids[i]), credit.probe.heads)
        mask = token_mask(strategy, waad, fai)
        assert torch.equal(stats["masks"][i], mask)
        assert torch.allclose(out[i], amplify(float(advantages[0, i]), mask))
        assert 0 < int(mask.sum()) < len(mask)
    assert torch.equal(out[2], torch.full((len(rollouts.response_ids[2]),), -1.3))


@pytest.mark.parametrize("method", ["preplan", "anchor", "coupled"])
def test_two_steps_of_each_rhythm_method_log_the_strategys_credit_and_loss(method, tiny_model_dir, data_file, tmp_path,
                                                                          rhythm_file, byte_tokenizer, monkeypatch):
    """Two loop steps on a crafted group (long correct, short correct, wrong): TLMRE rewards by hand, and the first
    step's amplified share and loss (-sum of the token advantages / tokens: on-policy, the ratio is 1) are those of
    the strategy's separate forward on the untrained model."""
    prompt = R1_TRACES[0]["prompt"]
    fake = crafted_rollouts(byte_tokenizer, [R1_TRACES[0]["response"], SHORT_55, WRONG_54], prompt)
    monkeypatch.setattr(loop, "generate_rollouts", lambda *args, **kwargs: fake)
    monkeypatch.setattr(PromptSource, "draw", lambda self, rng, k: [Prompt("p", prompt, "55")])
    config = small_config(tiny_model_dir, None, data_file, tmp_path / "out", method=method, rhythm=str(rhythm_file),
                          prompts_per_step=1, group_size=3)
    inputs = loop.prepare_run(config)
    long, short = 1 - 0.2 / (1 + math.exp(-1)), 1 - 0.2 / (1 + math.exp(1))  # z = +1, -1 for the two lengths
    advantages = torch.tensor([[long - short / 2, short - long / 2, -(long + short) / 2]])  # RLOO
    separate = strategy_class(method)(config)
    separate.attach(inputs.model, byte_tokenizer)
    expected, stats = separate_advantages(separate, inputs.model, CreditBatch(fake, torch.ones(1, 3), advantages, 0),
                                          inputs.pad_id, config.micro_batch_size)
    metrics = loop.train(inputs, config, progress=False)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["reward_mean"] == pytest.approx((long + short) / 3) and m["accuracy"] == pytest.approx(2 / 3)
               for m in metrics)
    assert 0 < stats["amplified_frac"] < 1, "nothing or everything amplified: the check would be vacuous"
    assert metrics[0]["amplified_frac"] == pytest.approx(stats["amplified_frac"])
    assert metrics[0]["loss"] == pytest.approx(-float(torch.cat(expected).sum()) / sum(map(len, expected)), abs=1e-6)


def test_rhythm_file_of_another_model_is_refused(tiny_model_dir, data_file, tmp_path, rhythm_file):
    header = json.loads(rhythm_file.read_text())
    header["model"]["num_heads"] = 12
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps(header) + "\n")
    config = small_config(tiny_model_dir, None, data_file, tmp_path / "out", method="anchor", rhythm=str(wrong))
    with pytest.raises(ValueError, match="num_heads = 12"):
        loop.prepare_run(config)


def test_config_checks_the_rhythm_settings():
    with pytest.raises(ValueError, match="rhythm_top"):
        TrainConfig(method="anchor", rhythm_top=0.0)
    with pytest.raises(ValueError, match="rhythm_gain"):
        TrainConfig(method="anchor", rhythm_gain=0.5)


# --- the paper's rule (rhythm_rule: paper; arXiv 2510.13554 v2, section 5.2) ------------------------------------

P_WAAD = torch.tensor([1.0, 9.0, 1.0, 1.5, 8.0, 1.0, 1.0])
# |WAAD_t - WAAD_t+1|: 8, 8, 0.5, 6.5, 7, 0, - -> top 3 of 6: t = 0, 1, 4 (smallest of them 7); median WAAD 1.0
P_FAI = torch.tensor([0.0, 0.1, 0.9, 0.2, 0.0, 0.8, NAN])  # top 3 of 6: s = 2, 5, 3


def test_waad_change_is_the_absolute_difference_to_the_next_token():
    assert torch.equal(waad_change(torch.tensor([1.0, 4.0, 2.0, 2.5])).nan_to_num(-9), torch.tensor([3.0, 2.0, 0.5, -9.0]))


def test_paper_preplan_takes_the_largest_waad_changes_where_the_project_takes_rises():
    assert paper_gamma("preplan", P_WAAD, P_FAI, 0.4, 1.5, PaperRule()).tolist() == [1.5, 1.5, 1, 1, 1.5, 1, 1]
    assert token_mask("preplan", P_WAAD, P_FAI).nonzero().flatten().tolist() == [1, 3, 4]  # rises 8, 0.5, 6.5


def test_paper_anchor_amplifies_the_largest_fai():
    assert paper_gamma("anchor", P_WAAD, P_FAI, 0.4, 1.5, PaperRule()).tolist() == [1, 1, 1.5, 1.5, 1, 1.5, 1]


def test_paper_coupled_hands_part_of_a_locally_dominated_anchors_bonus_to_its_introductory_token():
    # anchor 2: WAAD 1.0 <= median 1.0 and changes 8, 8 at u = 0, 1 >= 7: dominated, intro = 1 (the nearest tie);
    # anchor 5: WAAD 1.0, changes 0.5, 6.5, 7 at u = 2, 3, 4: dominated, intro = 4; anchor 3: WAAD 1.5 > 1.0: full gain.
    gamma = paper_gamma("coupled", P_WAAD, P_FAI, 0.4, 1.5, PaperRule(alpha=0.5, k=3))
    assert gamma.tolist() == [1, 1.25, 1.25, 1.5, 1.25, 1.25, 1]
    assert paper_gamma("coupled", P_WAAD, P_FAI, 0.4, 1.5, PaperRule(alpha=1.0, k=3)).tolist() == [1, 1.5, 1, 1.5, 1.5, 1, 1]
    # k = 1 looks at u = t - 1 only: changes 8 (before anchor 2) and 7 (before anchor 5), the same result
    assert paper_gamma("coupled", P_WAAD, P_FAI, 0.4, 1.5, PaperRule(alpha=0.5, k=1)).tolist() == gamma.tolist()
    # an introductory token that is an undominated anchor itself gets both bonuses
    fai = torch.tensor([0.0, 0.1, 0.9, 0.0, 0.7, 0.8, NAN])  # anchors 2, 5, 4
    assert paper_gamma("coupled", P_WAAD, fai, 0.4, 1.5, PaperRule()).tolist() == [1, 1.25, 1.25, 1, 1.75, 1.25, 1]


def test_paper_rule_scales_negative_advantages_and_needs_signals_for_them():
    from kfh_probe.sampling import Rollouts

    rollouts = Rollouts(3, [[1]] * 3, [[5] * 7, [6] * 7, [7] * 2], [""] * 3, [True] * 3)
    advantages = torch.tensor([[0.4, -0.4, 0.0]])
    signals = {0: RhythmSignals(1, P_WAAD, P_FAI), 1: RhythmSignals(1, P_WAAD, P_FAI)}
    out, stats = rhythm_advantages(advantages, rollouts, signals, "anchor", 0.4, 1.5, PaperRule())
    assert torch.allclose(out[0], 0.4 * torch.tensor([1, 1, 1.5, 1.5, 1, 1.5, 1]))
    assert torch.allclose(out[1], -0.4 * torch.tensor([1, 1, 1.5, 1.5, 1, 1.5, 1]))
    assert torch.equal(out[2], torch.zeros(2)) and stats["masks"][2] is None
    assert stats["amplified_frac"] == pytest.approx(6 / 14)
    with pytest.raises(ValueError, match="rollout 1 has a non-zero advantage"):
        rhythm_advantages(advantages, rollouts, {0: signals[0]}, "anchor", 0.4, 1.5, PaperRule())
    # the project's rule leaves the negative one uniform and needs no signals for it
    out, _ = rhythm_advantages(advantages, rollouts, {0: signals[0]}, "anchor", 0.4, 1.5)
    assert torch.equal(out[1], torch.full((7,), -0.4))


def test_config_checks_the_paper_rule_settings():
    with pytest.raises(ValueError, match="rhythm_rule"):
        TrainConfig(method="anchor", rhythm_rule="arxiv")
    with pytest.raises(ValueError, match="rhythm_alpha"):
        TrainConfig(method="coupled", rhythm_alpha=1.5)
    with pytest.raises(ValueError, match="rhythm_k"):
        TrainConfig(method="coupled", rhythm_k=0)
