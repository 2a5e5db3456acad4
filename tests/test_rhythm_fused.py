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
from attnpo_train.rewards import rollout_correctness
from attnpo_train.strategies import CreditBatch, read_separately, strategy_class
from conftest import max_difference, separate_advantages
from kfh_probe.organism import default_model_dir

TOLERANCE = 1e-6  # |fused - unfused| per-token advantage: float rounding of two forwards, no token flipped


def rhythm_strategy(method: str, model, tokenizer, **settings):
    """The attached strategy of ``method`` (the organism's rhythm file unless ``rhythm`` is set)."""
    strategy = strategy_class(method)(TrainConfig(method=method, **settings))
    strategy.attach(model, tokenizer)
    return strategy


def both_paths(strategy, model, batch, pad_id):
    """(unfused advantages, metrics, gradients), (fused advantages, metrics, gradients) of one update: the signals
    read in separate no-grad forwards (``read_separately``), then off the update's own."""
    results = []
    for fused in (False, True):
        strategy.prepare(batch)
        if not fused:
            read_separately(strategy, model, pad_id, strategy.config.micro_batch_size)
        loop.accumulate_policy_gradient(model, None, batch.rollouts, strategy, strategy.config, pad_id)
        values = [strategy.handed_out[i] for i in range(len(batch.rollouts.response_ids))]
        results.append((values, strategy.metrics(), [p.grad.clone() for p in model.parameters()]))
    return results


@pytest.mark.parametrize("rule", ["project", "paper"])
@pytest.mark.parametrize("method", ["preplan", "anchor", "coupled"])
def test_fused_and_unfused_rhythm_credit_agree_on_the_organism(method, rule, organism_rollouts):
    model, tokenizer, prompts, rollouts, _ = organism_rollouts
    # micro-batches of 3 split the groups of 4 and mix rollouts with and without signals: the separate
    # forward's batches (those with signals only) are composed and padded differently from the update's
    strategy = rhythm_strategy(method, model, tokenizer, rhythm_rule=rule, micro_batch_size=3)
    correct = rollout_correctness(rollouts, [p.answer for p in prompts], strategy.config)
    advantages = group_advantages(strategy.rewards(correct, rollouts), strategy.config.estimator)
    unfused, fused = both_paths(strategy, model, CreditBatch(rollouts, correct, advantages, 0), tokenizer.pad_token_id)
    difference = max_difference(unfused[0], fused[0])
    print(f"\n{method} ({rule} rule): max |fused - unfused| advantage {difference:.3g}")
    assert difference <= TOLERANCE
    assert fused[1] == unfused[1] and fused[1]["amplified_frac"] > 0
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
    strategy = rhythm_strategy("anchor", model, byte_tokenizer,
                               rhythm=str(write_rhythm_file(tmp_path / "rhythm.jsonl", tiny_model_dir)))
    prompt = byte_tokenizer("Q: 1+1?", add_special_tokens=False)["input_ids"]
    responses = [byte_tokenizer(text, add_special_tokens=False)["input_ids"]
                 for text in ("It is two, so the answer is 2.", "Two.", "The sum of one and one is two.")]
    rollouts = Rollouts(3, [prompt] * 3, responses, [""] * 3, [True] * 3)
    batch = CreditBatch(rollouts, torch.ones(1, 3), torch.tensor([[0.5, -0.5, 0.0]]), 0)
    strategy.prepare(batch)
    ids = torch.zeros((3, max(len(prompt) + len(r) for r in responses)), dtype=torch.long)
    for b, r in enumerate(responses):
        ids[b, : len(prompt) + len(r)] = torch.tensor(prompt + r)
    with torch.no_grad(), strategy.observe(model, [0, 1, 2], ids):
        model(input_ids=ids, attention_mask=(ids != 0).long())
    assert sorted(strategy.readings) == [0]  # the project's rule: only the positive advantage needs signals
    values = strategy.token_advantages([0, 1, 2])
    expected, _ = separate_advantages(strategy, model, batch, 0)
    assert max_difference(values, expected) <= TOLERANCE
    assert torch.equal(values[1], torch.full((len(responses[1]),), -0.5))
