"""Ground truth in the trainer: the research controls of AttnPO's step scores (shuffled, oracle), the
precision of the credit, step accounting in training metrics and in sampled evaluation, AES."""

from __future__ import annotations

import json
import random

import pytest
import torch

from attnpo_train.cli import main
from attnpo_train.config import TrainConfig
from attnpo_train.strategies.attnpo import AlignedSteps, StepRating, oracle_ratings, rescale_rollouts, shuffled_orders
from attnpo_train.data import Prompt
from attnpo_train.evaluate import aes, efficiency, evaluate
from attnpo_train.truth import (
    boundary_correlation, credit_precision, labeled_step_starts, mean_accounting, rated_step_truth,
)
from kfh_probe.organism import default_manifest_path, default_model_dir
from kfh_probe.organism.labeler import step_accounting
from kfh_probe.organism.task import generate_problems, teacher_response, teacher_steps
from kfh_probe.sampling import Rollouts

ORGANISM = default_model_dir()


def fake_rollouts(n: int, prompt_len: int = 10, response_len: int = 30) -> Rollouts:
    return Rollouts(n, [[0] * prompt_len] * n, [[1] * response_len] * n, ["x"] * n, [True] * n)


def test_shuffled_scores_keep_each_multiset_and_the_fraction_attenuated():
    rng = torch.Generator().manual_seed(0)
    aligned = [AlignedSteps([(0, 5), (5, 10), (10, 15), (15, 20)], 5) for _ in range(4)]
    ratings = [StepRating(a.spans, torch.rand(4, generator=rng) * 0.2, 5 / 40) for a in aligned]
    rollouts = fake_rollouts(4)
    orders = shuffled_orders(aligned, seed=3)  # drawn from the step counts alone, before any score exists
    assert [o.tolist() for o in shuffled_orders(aligned, seed=3)] == [o.tolist() for o in orders]
    shuffled = [StepRating(r.spans, r.scores[order], r.bar) for r, order in zip(ratings, orders)]  # as AttnPO
    assert any(a.scores.tolist() != b.scores.tolist() for a, b in zip(ratings, shuffled))
    for a, b in zip(ratings, shuffled):
        assert sorted(a.scores.tolist()) == sorted(b.scores.tolist()) and a.spans == b.spans
    correct = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages = torch.tensor([[0.5, 0.2, -0.3, -0.4]])
    config = TrainConfig(horizon=0)
    _, before = rescale_rollouts(rollouts, correct, advantages, ratings, 0, config)
    _, after = rescale_rollouts(rollouts, correct, advantages, shuffled, 0, config)
    assert before["attenuated_steps"] == after["attenuated_steps"] > 0


def test_oracle_gammas_attenuate_exactly_the_redundant_steps_and_shield_exactly_the_essential_ones():
    spans = [(0, 5), (5, 10), (10, 20)]
    aligned = [AlignedSteps(spans, 4), AlignedSteps(spans, 4), None]
    truth = [[True, False, True], [False, True, False], None]
    rollouts = fake_rollouts(3, prompt_len=10, response_len=30)
    uniform = 4 / 40  # |F| / |o|
    oracle = oracle_ratings(aligned, truth, [uniform, uniform, None])
    assert oracle[0].scores.tolist() == pytest.approx([2 * uniform, 0.0, 2 * uniform])
    assert oracle[2] is None
    # p = 2/3 (two of three correct); A > 0 for the first, A < 0 for the second; attenuation active
    correct = torch.tensor([[1.0, 1.0, 0.0]])
    advantages = torch.tensor([[0.4, -0.2, -0.2]])
    out, stats = rescale_rollouts(rollouts, correct, advantages, oracle, 0, TrainConfig(horizon=0))
    p = 2 / 3
    assert stats["gammas"][0].tolist() == pytest.approx([1.0, 1 - p**2, 1.0])  # S_k = 0: gamma = 1 - p^beta
    assert stats["gammas"][1].tolist() == [1.0, 0.0, 1.0]  # the essential step is shielded
    assert out[0][5:10].tolist() == pytest.approx([0.4 * (1 - p**2)] * 5)
    tau = 0.9  # the reasoning baseline's bar: the same steps attenuated and shielded, by the same gammas
    _, under_margin = rescale_rollouts(rollouts, correct, advantages, oracle_ratings(aligned, truth, [tau, tau, None]),
                                       0, TrainConfig(horizon=0))
    assert [g.tolist() for g in under_margin["gammas"][:2]] == [g.tolist() for g in stats["gammas"][:2]]
    with pytest.raises(ValueError, match="ground-truth"):
        oracle_ratings(aligned, None, [uniform, uniform, None])


def test_credit_precision_counts_attenuated_redundant_and_shielded_essential_steps():
    gammas = [torch.tensor([1.0, 0.3, 0.5]), torch.tensor([0.0, 1.0, 0.0]), None, torch.tensor([0.2])]
    truth = [[True, False, True], [True, False, False], None, None]
    got = credit_precision(gammas, [0.5, -0.5, 0.1, 0.3], truth)
    assert got == {"pos_attenuated_steps": 2.0, "pos_precision": 0.5, "neg_shielded_steps": 2.0, "neg_precision": 0.5}
    assert credit_precision([None], [1.0], [None])["pos_precision"] is None


def teacher_record(seed: int = 4):
    rng = random.Random(seed)
    problem = generate_problems(1, seed)[0]
    steps = teacher_steps(problem, rng)
    return problem, steps, teacher_response(problem, steps)


def test_rated_step_truth_matches_steps_by_character_position():
    problem, steps, response = teacher_record()
    texts = [s.text for s in steps]
    texts[0] = "<think>\n" + texts[0]
    ranges, pos = [], 0
    for text in texts:
        ranges.append((pos, pos + len(text)))
        pos += len(text)
    assert rated_step_truth(problem.prompt(), response, ranges) == [s.essential for s in steps]
    merged = [(ranges[0][0], ranges[1][1])] + ranges[2:]  # a coarser segmenter: essential if any part is
    assert rated_step_truth(problem.prompt(), response, merged) == [steps[0].essential or steps[1].essential] + [
        s.essential for s in steps[2:]]
    assert rated_step_truth("not an organism prompt", response, ranges) is None


def test_labeled_step_starts_are_where_each_line_step_begins():
    problem, steps, response = teacher_record()
    starts = labeled_step_starts(problem.prompt(), response)
    assert [essential for _, essential in starts] == [s.essential for s in steps]
    assert [response[pos:].startswith(s.text) for (pos, _), s in zip(starts[1:], steps[1:])] == [True] * (len(steps) - 1)
    assert labeled_step_starts("not an organism prompt", response) is None


def test_boundary_correlation_hand_computed():
    # x = 0.5, 0.5, -0.5, 1.0 (mean 0.375); y = 1, 0, 1, 0 (mean 0.5)
    # sxy = 0.0625 - 0.0625 - 0.4375 - 0.3125 = -0.75 ; sxx = 1.1875 ; syy = 1
    got = boundary_correlation([(0.5, True), (0.5, False), (-0.5, True), (1.0, False)])
    assert got == pytest.approx(-0.75 / 1.1875 ** 0.5)
    assert boundary_correlation([(0.5, True), (0.2, True)]) is None  # no essential step: no variance
    assert boundary_correlation([(0.5, True)]) is None


def test_mean_accounting_is_absent_when_nothing_is_readable():
    problem, _, response = teacher_record()
    account = step_accounting(problem.prompt(), response)
    means = mean_accounting([account, None])
    assert means["labelled_fraction"] == 0.5 and means["essential_steps"] == account["essential_steps"]
    assert mean_accounting([None, None]) is None


def test_aes_uses_the_published_weights():
    assert aes(0.2, 0.55, 0.5) == pytest.approx(0.2 + 3 * 0.1)
    assert aes(0.2, 0.45, 0.5) == pytest.approx(0.2 - 5 * 0.1)
    assert aes(0.2, 0.3, 0.0) is None
    scores = efficiency({"accuracy": 0.45, "response_tokens_mean": 80.0}, {"accuracy": 0.5, "response_tokens_mean": 100.0})
    assert scores["aes"] == pytest.approx(-0.3) and scores["aes_weights"] == {"gain": 3.0, "loss": 5.0}


def organism_prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", p.prompt(), str(p.answer)) for i, p in enumerate(generate_problems(n, 555))]


def test_sampled_evaluation_is_avg_at_k_seeded_with_ground_truth_steps(organism):
    model, tokenizer = organism
    prompts = organism_prompts(3)
    state = torch.get_rng_state()
    first = evaluate(model, tokenizer, prompts, 320, samples=2, temperature=0.6, top_p=0.95, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    again = evaluate(model, tokenizer, prompts, 320, samples=2, temperature=0.6, top_p=0.95, seed=5)
    assert first == again
    assert (first["n"], first["samples"], first["temperature"], first["top_p"]) == (3, 2, 0.6, 0.95)
    assert first["accuracy"] * 6 == pytest.approx(round(first["accuracy"] * 6))  # a fraction of 6 responses
    steps = first["steps"]
    assert steps["labelled_fraction"] == 1.0 and steps["essential_steps"] >= 2
    assert steps["redundant_steps"] == pytest.approx(steps["other"] + steps["recheck"] + steps["restate"], abs=0.5)
    greedy = evaluate(model, tokenizer, prompts, 320)
    assert greedy["samples"] == 1 and greedy["temperature"] is None and "steps" in greedy
    with pytest.raises(ValueError, match="temperature"):
        evaluate(model, tokenizer, prompts, 320, samples=2)


def test_step_accounting_is_absent_for_data_the_labeler_cannot_read(tiny_model_dir, data_file):
    from kfh_probe.loading import load_model, load_tokenizer
    from attnpo_train.data import load_prompts

    result = evaluate(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), load_prompts(data_file), 6,
                      samples=2, temperature=1.0)
    assert "steps" not in result and result["n"] == 2


@pytest.mark.slow
def test_eval_cli_reports_greedy_and_avg_at_k_with_aes(capsys):
    code = main(["eval", "--model", str(ORGANISM), "--base", str(ORGANISM), "--n", "2", "--samples", "2",
                 "--max-new-tokens", "320", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    sampled = report["sampled"]
    assert sampled["result"] == sampled["base"] and sampled["result"]["samples"] == 2
    assert sampled["result"]["temperature"] == 0.6 and sampled["result"]["top_p"] == 0.95
    assert sampled["aes"] == 0.0 and report["aes"] == 0.0 and "steps" in report["result"]
    assert main(["eval", "--model", str(ORGANISM), "--n", "1", "--samples", "1", "--top-p", "0"]) == 2


@pytest.mark.parametrize("credit", ["attention", "shuffled", "oracle"])
def test_organism_training_logs_ground_truth_steps_and_credit_precision(credit, tmp_path):
    from attnpo_train.loop import prepare_run, train

    config = TrainConfig(method="attnpo", credit=credit, steps=1, prompts_per_step=2, group_size=4, max_new_tokens=320,
                         horizon=0, lr=1e-5, seed=1, model=str(ORGANISM), manifest=str(default_manifest_path()),
                         out=str(tmp_path / credit), checkpoint_every=10)
    [metrics] = train(prepare_run(config), config, progress=False)
    assert metrics["labelled_fraction"] == 1.0
    assert metrics["essential_steps_per_response"] >= 2 and metrics["redundant_steps_per_response"] >= 0
    assert {"pos_attenuated_steps", "pos_precision", "neg_shielded_steps", "neg_precision"} <= metrics.keys()
    assert 0 <= metrics["redundant_in_positive_share"] <= 1 and 0 <= metrics["essential_in_negative_share"] <= 1
    assert metrics["boundary_redundant_corr"] is None or -1 <= metrics["boundary_redundant_corr"] <= 1
    if credit == "oracle" and metrics["pos_precision"] is not None:
        assert metrics["pos_precision"] == 1.0
    if credit == "oracle" and metrics["neg_precision"] is not None:
        assert metrics["neg_precision"] == 1.0


def test_controls_are_refused_outside_attnpo_and_oracle_needs_organism_prompts(tiny_model_dir, data_file, tmp_path):
    from attnpo_train.loop import prepare_run

    with pytest.raises(ValueError, match="credit"):
        TrainConfig(method="tlmre", credit="shuffled")
    config = TrainConfig(method="attnpo", credit="oracle", model=str(tiny_model_dir), data=str(data_file),
                         manifest=str(default_manifest_path()), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="organism"):
        prepare_run(config)


def test_credit_metrics_read_the_advantage_at_each_labeled_steps_first_token(organism):
    from attnpo_train.truth import GroundTruth
    from kfh_probe.sampling import Rollouts

    model, tokenizer = organism
    problem, steps, response = teacher_record()
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    rollouts = Rollouts(2, [[0], [0]], [ids, ids], [response, response], [True, True])
    truth = GroundTruth.read([problem.prompt()] * 2, rollouts)
    starts = labeled_step_starts(problem.prompt(), response)
    # rollout 0: +1 on every token but -1 on the first token of each redundant step; rollout 1: all 0.
    first_tokens = [len(tokenizer(response[:pos], add_special_tokens=False)["input_ids"]) for pos, _ in starts]
    values = torch.ones(len(ids))
    for token, (_, essential) in zip(first_tokens, starts):
        if not essential:
            values[token] = -1.0
    got = truth.credit_metrics(tokenizer, rollouts, torch.tensor([[1.0, -1.0]]), {0: values, 1: torch.zeros(len(ids))})
    redundant, essential = sum(not e for _, e in starts), sum(e for _, e in starts)
    assert got["redundant_in_positive_share"] == 0.5 and got["essential_in_negative_share"] == 0.5
    xs = [-1.0] * redundant + [1.0] * essential + [0.0] * (redundant + essential)
    ys = [True] * redundant + [False] * essential + [True] * redundant + [False] * essential
    assert got["boundary_redundant_corr"] == pytest.approx(boundary_correlation(list(zip(xs, ys))))
