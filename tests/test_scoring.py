"""Step scores, per-trace AUC (SRA), bootstrap intervals and ensembles on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from kfh_probe.scoring import bootstrap_ci, ensemble_sra, greedy_ensemble, pair_auc, per_trace_auc, step_scores


def test_step_score_is_the_mean_over_the_step_tokens_of_the_summed_answer_attention():
    # answer rows summed: positions 0..5
    summed = torch.tensor([[0.0, 1.0, 3.0, 0.5, 0.5, 2.0]])
    scores = step_scores(summed, [(1, 3), (3, 5), (5, 6)])
    # (1+3)/2 = 2, (0.5+0.5)/2 = 0.5, 2/1 = 2
    assert torch.allclose(scores, torch.tensor([[2.0, 0.5, 2.0]]))


def test_step_score_rejects_empty_or_out_of_range_spans():
    with pytest.raises(ValueError, match="empty or outside"):
        step_scores(torch.zeros(4), [(2, 2)])
    with pytest.raises(ValueError, match="empty or outside"):
        step_scores(torch.zeros(4), [(3, 5)])


def test_pair_auc_counts_ties_as_half():
    # two heads, steps: E(0.9) R(0.5) E(0.5) R(0.1)
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.1, 0.9, 0.2, 0.3]])
    essential = torch.tensor([True, False, True, False])
    redundant = ~essential
    auc = pair_auc(scores, essential, redundant)
    # head 0: pairs (0.9>0.5) 1, (0.9>0.1) 1, (0.5=0.5) 0.5, (0.5>0.1) 1 -> 3.5/4
    # head 1: (0.1<0.9) 0, (0.1<0.3) 0, (0.2<0.9) 0, (0.2<0.3) 0 -> 0
    assert torch.allclose(auc, torch.tensor([0.875, 0.0], dtype=torch.float64))


def test_traces_without_a_pair_are_excluded_and_counted():
    scores = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0, 2.0]])]
    labels = [["essential", "redundant"], ["essential", "essential"], ["redundant", None, "essential"]]
    auc, used, pairs = per_trace_auc(scores, labels)
    assert used == [0, 2] and pairs == 2
    assert auc.flatten().tolist() == [1.0, 1.0]


def test_label_count_must_match_scores():
    with pytest.raises(ValueError, match="2 step scores but 3 labels"):
        per_trace_auc([torch.zeros(1, 2)], [["essential", "redundant", "redundant"]])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    g = torch.Generator().manual_seed(0)
    auc = torch.rand(50, 3, generator=g, dtype=torch.float64)
    a = bootstrap_ci(auc, 500, seed=1)
    b = bootstrap_ci(auc, 500, seed=1)
    assert torch.equal(a, b)
    mean = auc.mean(0)
    assert bool(((a[:, 0] <= mean) & (mean <= a[:, 1])).all())
    assert not torch.equal(a, bootstrap_ci(auc, 500, seed=2))


def test_ensemble_averages_the_heads_step_scores_before_ranking():
    # head 0 ranks E over R by a little, head 1 ranks R over E by a lot: the mean ranks R first.
    scores = [torch.tensor([[0.6, 0.5], [0.0, 0.9]])]
    labels = [["essential", "redundant"]]
    assert ensemble_sra(scores, labels, [0]) == 1.0
    assert ensemble_sra(scores, labels, [1]) == 0.0
    assert ensemble_sra(scores, labels, [0, 1]) == 0.0  # (0.3, 0.7)


def test_greedy_ensemble_picks_the_head_that_raises_sra_most():
    scores = [torch.tensor([[0.2, 0.1, 0.3], [0.9, 0.0, 0.0], [0.5, 0.5, 0.5]]),
              torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.0, 0.9], [0.5, 0.5, 0.5]])]
    labels = [["essential", "redundant", "redundant"], ["redundant", "redundant", "essential"]]
    path = greedy_ensemble(scores, labels, max_size=2)
    assert path[0] == (1, 1.0)  # head 1 is perfect alone
    assert path[1][0] in (0, 2) and len(path) == 2
