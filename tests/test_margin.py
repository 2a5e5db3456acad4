"""The reasoning baseline of AttnPO's credit: relative step scores, the calibrated margin the sweep records
in the manifest, and the trainer's use of it."""

from __future__ import annotations

import json

import pytest
import torch

from attnpo_train.config import TrainConfig
from conftest import small_config, write_manifest
from kfh_probe import InputError
from kfh_probe.manifest import validate_manifest
from kfh_probe.margin import best_margin, margin_block, margin_for, relative_step_scores, uniform_bar
from kfh_probe.organism import default_manifest_path


def test_uniform_bar_is_answer_share_of_every_token():
    assert uniform_bar(torch.tensor([10, 5]), torch.tensor([200, 20])).tolist() == pytest.approx([0.05, 0.25])


def test_uniform_bar_validation():
    with pytest.raises(ValueError, match="answer_len"):
        uniform_bar(torch.tensor([0]), torch.tensor([10]))
    with pytest.raises(ValueError, match="answer_len"):
        uniform_bar(torch.tensor([11]), torch.tensor([10]))


def test_relative_scores_divide_each_head_by_its_token_weighted_mean_before_averaging():
    # head 0: scores 0.2, 0.4 over steps of 1 and 3 tokens: b = (0.2 + 1.2) / 4 = 0.35 -> 0.2/0.35, 0.4/0.35
    # head 1: 0.01, 0.01 (a sink-heavy head): b = 0.01 -> 1, 1 ; it counts as much as head 0
    got = relative_step_scores(torch.tensor([[0.2, 0.4], [0.01, 0.01]]), [1, 3])
    assert got.tolist() == pytest.approx([(0.2 / 0.35 + 1) / 2, (0.4 / 0.35 + 1) / 2])


def test_a_head_with_no_attention_on_the_reasoning_counts_every_step_as_its_mean():
    got = relative_step_scores(torch.tensor([[0.0, 0.0], [0.1, 0.3]]), [2, 2])
    assert got.tolist() == pytest.approx([(1 + 0.5) / 2, (1 + 1.5) / 2])


def test_relative_scores_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="one length per step"):
        relative_step_scores(torch.ones(2, 3), [1, 2])
    with pytest.raises(ValueError, match="positive step lengths"):
        relative_step_scores(torch.ones(1, 2), [1, 0])


def test_best_margin_maximises_youdens_j_and_takes_the_smallest_tie():
    # tau 0.65: redundant below 2/3, essential at or above 3/3 ; tau 0.95: 3/3 and 2/3 ; equal J, 0.65 first
    assert best_margin([1.0, 1.2, 0.8], [0.3, 0.5, 0.9]) == pytest.approx(0.65)
    assert best_margin([2.0], [1.0]) == pytest.approx(1.5)  # perfectly separated: between them
    with pytest.raises(ValueError, match="at least one essential and one redundant"):
        best_margin([], [1.0])


def test_margin_block_reports_both_baselines_on_the_labeled_steps():
    # one trace, 2 heads (rows best first: 1 then 0), 3 steps of 1 token: essential, redundant, unlabeled
    scores = [torch.tensor([[0.1, 0.3, 0.5], [0.4, 0.1, 0.1]])]
    block = margin_block(scores, [["essential", "redundant", None]], [[1, 1, 1]], [0.2], ranked_heads=[1, 0], sizes=5)
    assert block["steps"] == {"essential": 1, "redundant": 1}
    assert [e["heads"] for e in block["by_heads"]] == [1, 2]
    top1 = block["by_heads"][0]  # head row 1: mean 0.2 -> relative 2.0, 0.5 ; tau halfway
    assert top1["tau"] == pytest.approx(1.25)
    assert top1["reasoning"] == {"essential_below": 0.0, "redundant_below": 1.0}
    # the paper's bar 0.2: essential 0.4 above, redundant 0.1 below
    assert top1["uniform"] == {"essential_below": 0.0, "redundant_below": 1.0}
    top2 = block["by_heads"][1]  # mean of the two heads: 0.25, 0.2 against 0.2: the redundant step is not below
    assert top2["uniform"] == {"essential_below": 0.0, "redundant_below": 0.0}


def test_the_shipped_manifests_record_valid_margins_for_every_ensemble_size():
    for organism in ("v4", "v5"):
        manifest = json.loads(default_manifest_path(organism).read_text(encoding="utf-8"))
        assert validate_manifest(manifest) == []
        assert margin_for(manifest, manifest["top_n"]) > 0


def test_a_broken_margins_block_is_a_schema_problem():
    manifest = json.loads(default_manifest_path().read_text(encoding="utf-8"))
    manifest["margins"]["by_heads"][0]["reasoning"]["essential_below"] = 1.5
    assert any("margins.by_heads[0]" in p for p in validate_manifest(manifest))


def test_margin_for_names_what_to_do_when_the_manifest_has_none():
    with pytest.raises(InputError, match="re-run `kfh-probe sweep`"):
        margin_for({"heads": []}, 3, "m.json")
    manifest = json.loads(default_manifest_path().read_text(encoding="utf-8"))
    with pytest.raises(InputError, match="not 11"):
        margin_for(manifest, 11)


def test_the_reasoning_baseline_refuses_a_manifest_without_margins(tiny_model_dir, manifest_file, data_file, tmp_path):
    from attnpo_train.loop import prepare_run

    with pytest.raises(InputError, match="records no calibrated margin"):
        prepare_run(small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "o", baseline="reasoning"))


def test_the_reasoning_baseline_rates_steps_against_the_recorded_margin(tiny_model_dir, data_file, tmp_path):
    from attnpo_train.loop import prepare_run, train

    path = write_manifest(tmp_path / "m.json", tiny_model_dir)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    fractions = {"essential_below": 0.1, "redundant_below": 0.9}
    manifest["margins"] = {"by_heads": [{"heads": k, "tau": 5.0, "reasoning": fractions, "uniform": fractions}
                                        for k in (1, 2, 3)]}
    path.write_text(json.dumps(manifest), encoding="utf-8")
    config = small_config(tiny_model_dir, path, data_file, tmp_path / "o", baseline="reasoning", horizon=0)
    inputs = prepare_run(config)
    assert inputs.strategy.margin == 5.0
    metrics = train(inputs, config, progress=False)
    assert len(metrics) == 2


def test_baseline_is_a_checked_setting():
    with pytest.raises(Exception, match="'baseline' must be one of"):
        TrainConfig(baseline="median")
