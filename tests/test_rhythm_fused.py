"""Fused rhythm signals (``TrainConfig.fused_scoring`` for "preplan", "anchor", "coupled"): WAAD and FAI read off the
update's own forward give the per-token advantages, gradients and training metrics of the separate no-grad
forward, under both token rules; the recorder skips the rows that need no signals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnpo_train import loop
from attnpo_train.advantages import group_advantages
from attnpo_train.config import TrainConfig
from attnpo_train.credit import rollout_rewards
from attnpo_train.rhythm import FusedRhythmCredit, PaperRule, rhythm_token_advantages
from kfh_probe.preplan_anchor import PreplanAnchorHeads
from conftest import max_difference
from kfh_probe.organism import default_model_dir, default_rhythm_path

TOLERANCE = 1e-6  # |fused - unfused| per-token advantage: float rounding of two forwards, no token flipped


def both_paths(model, rollouts, advantages, probe, strategy, paper, config, pad_id):
    """(unfused advantages, stats, gradients), (fused advantages, stats, gradients) of one update."""
    results = []
    for fused in (False, True):
        if fused:
            credit = FusedRhythmCredit(rollouts, advantages, probe, strategy, 0.4, 1.5, paper)
            loop.accumulate_policy_gradient(model, None, rollouts, credit, config, pad_id)
            values, stats = credit.handed_out, credit.stats()
        else:
            values, stats = rhythm_token_advantages(model, rollouts, advantages, probe, strategy, 0.4, 1.5, pad_id,
                                                    config.micro_batch_size, paper)
            loop.accumulate_policy_gradient(model, None, rollouts, values, config, pad_id)
        results.append((values, stats, [p.grad.clone() for p in model.parameters()]))
    return results


@pytest.mark.parametrize("paper", [None, PaperRule()], ids=["project", "paper"])
@pytest.mark.parametrize("strategy", ["preplan", "anchor", "coupled"])
def test_fused_and_unfused_rhythm_credit_agree_on_the_organism(strategy, paper, organism_rollouts):
    model, tokenizer, prompts, rollouts, _ = organism_rollouts
    # micro-batches of 3 split the groups of 4 and mix rollouts with and without signals: the separate
    # forward's batches (those with signals only) are composed and padded differently from the update's
    config = TrainConfig(method=strategy, group_size=4, micro_batch_size=3)
    correct, rewards = rollout_rewards(rollouts, prompts, config)
    advantages = group_advantages(rewards, config.estimator)
    probe = PreplanAnchorHeads.from_file(default_rhythm_path(), model)
    unfused, fused = both_paths(model, rollouts, advantages, probe, strategy, paper, config, tokenizer.pad_token_id)
    difference = max_difference(unfused[0], fused[0])
    print(f"\n{strategy} ({'paper' if paper else 'project'} rule): max |fused - unfused| advantage {difference:.3g}")
    assert difference <= TOLERANCE
    assert fused[1]["amplified_frac"] == unfused[1]["amplified_frac"] > 0
    assert max_difference(unfused[2], fused[2]) <= 1e-6
    assert any(len(set(v.tolist())) > 1 for v in fused[0]), "no token was amplified: the check would be vacuous"


@pytest.mark.slow  # two seeded 2-step organism runs
def test_fused_and_unfused_seeded_rhythm_runs_log_the_same_metrics(tmp_path):
    config = TrainConfig(method="coupled", steps=2, prompts_per_step=2, group_size=4, max_new_tokens=320, lr=2e-3,
                         seed=3, micro_batch_size=3, model=str(default_model_dir()), out=str(tmp_path / "fused"),
                         checkpoint_every=10)
    fused = loop.train(loop.prepare_run(config), config, progress=False)
    unfused_config = dataclasses.replace(config, fused_scoring=False, out=str(tmp_path / "unfused"))
    unfused = loop.train(loop.prepare_run(unfused_config), unfused_config, progress=False)
    assert any(m["amplified_frac"] > 0 for m in fused) and len({m["loss"] for m in fused}) == 2
    timing = set(loop.TIMING_FIELDS)
    assert [{k: v for k, v in m.items() if k not in timing} for m in fused] == \
        [{k: v for k, v in m.items() if k not in timing} for m in unfused]
    assert all(m["time_scoring_s"] > 0 for m in fused)


def test_fused_rhythm_credit_records_only_the_rows_that_need_signals(byte_tokenizer, tiny_model_dir, tmp_path):
    from conftest import write_rhythm_file

    from kfh_probe.sampling import Rollouts
    from kfh_probe.loading import load_model

    model = load_model(tiny_model_dir)
    probe = PreplanAnchorHeads.from_file(write_rhythm_file(tmp_path / "rhythm.jsonl", tiny_model_dir), model)
    prompt = byte_tokenizer("Q: 1+1?", add_special_tokens=False)["input_ids"]
    responses = [byte_tokenizer(text, add_special_tokens=False)["input_ids"]
                 for text in ("It is two, so the answer is 2.", "Two.", "The sum of one and one is two.")]
    rollouts = Rollouts(3, [prompt] * 3, responses, [""] * 3, [True] * 3)
    credit = FusedRhythmCredit(rollouts, torch.tensor([[0.5, -0.5, 0.0]]), probe, "anchor", 0.4, 1.5)
    ids = torch.zeros((3, max(len(prompt) + len(r) for r in responses)), dtype=torch.long)
    for b, r in enumerate(responses):
        ids[b, : len(prompt) + len(r)] = torch.tensor(prompt + r)
    with torch.no_grad(), credit.observe(model, [0, 1, 2], ids):
        model(input_ids=ids, attention_mask=(ids != 0).long())
    assert sorted(credit._signals) == [0]  # the project's rule: only the positive advantage needs signals
    values = credit.token_advantages([0, 1, 2])
    expected, _ = rhythm_token_advantages(model, rollouts, torch.tensor([[0.5, -0.5, 0.0]]), probe, "anchor", 0.4, 1.5,
                                          0, 8)
    assert max_difference(values, expected) <= TOLERANCE
    assert torch.equal(values[1], torch.full((len(responses[1]),), -0.5))
