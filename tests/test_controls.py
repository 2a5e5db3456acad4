"""The probe's controls (manifest version 2): SRA by the order of the pair, position / length baselines,
the permutation null, split-half reliability; and version-1 manifests still read everywhere."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kfh_probe.cli import main
from kfh_probe.manifest import load_manifest, validate_manifest
from kfh_probe.scoring import pair_auc, per_trace_auc, permutation_null, split_half_reliability
from kfh_probe.sweep import SweepConfig, baselines_block

V1_MANIFEST = Path(__file__).resolve().parent / "data" / "organism_manifest_v1.json"
E, R = "essential", "redundant"


def test_redundant_after_and_before_count_only_the_pairs_in_that_order():
    # steps: R0 E1 R2 E3; head 0 scores (0.9, 0.5, 0.1, 0.3)
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.3]])
    labels = [[R, E, R, E]]
    # after-pairs (redundant later): (E1, R2) win, (E3, -) none -> 1.0 over 1 pair
    after, used, pairs = per_trace_auc([scores], labels, "after")
    assert after.flatten().tolist() == [1.0] and pairs == 1
    # before-pairs: (E1, R0) loss, (E3, R0) loss, (E3, R2) win -> 1/3
    before, _, pairs = per_trace_auc([scores], labels, "before")
    assert before.flatten().tolist() == [pytest.approx(1 / 3)] and pairs == 3
    everything, _, pairs = per_trace_auc([scores], labels)
    assert everything.flatten().tolist() == [0.5] and pairs == 4


def test_a_trace_without_pairs_in_one_order_is_left_out_of_that_control():
    scores = [torch.tensor([[0.2, 0.1]]), torch.tensor([[0.1, 0.2]])]
    labels = [[E, R], [R, E]]
    after, used, _ = per_trace_auc(scores, labels, "after")
    assert used == [0] and after.flatten().tolist() == [1.0]
    before, used, _ = per_trace_auc(scores, labels, "before")
    assert used == [1] and before.flatten().tolist() == [1.0]
    assert pair_auc(scores[0], torch.tensor([True, False]), torch.tensor([False, True]), "before") is None
    with pytest.raises(ValueError, match="direction"):
        per_trace_auc(scores, labels, "later")


def test_position_and_length_baselines_on_traces_whose_essential_steps_come_first_and_are_short():
    labels = [[E, E, R], [E, R, R, None]]
    lengths = [[3, 4, 9], [2, 8, 8, 1]]
    flat = [torch.zeros(2, 3), torch.zeros(2, 4)]
    block = baselines_block(flat, labels, lengths, torch.tensor([0.5, 0.5]), SweepConfig(bootstrap=50, permutations=20))
    assert block["position_earlier"]["sra"] == 1.0 and block["position_later"]["sra"] == 0.0
    assert block["step_length"]["sra"] == 0.0  # every essential step is shorter than every redundant one
    assert block["position_earlier"]["ci95"] == [1.0, 1.0]
    # constant scores tie every pair: the null is exactly 0.5 and no head is above it
    assert block["permutation_null"]["head_sra_p95"] == 0.5 and block["permutation_null"]["heads_above_head_p95"] == 0


def test_permutation_null_takes_only_the_values_of_label_shuffles_with_ties_counted_half():
    scores = torch.tensor([[0.4, 0.4, 0.9, 0.1], [1.0, 2.0, 3.0, 4.0]])  # head 0 has a tie
    labels = [E, R, E, R]
    possible = set()
    for essential_at in itertools.combinations(range(4), 2):
        shuffled = torch.tensor([k in essential_at for k in range(4)])
        possible.add(tuple(round(v, 9) for v in pair_auc(scores, shuffled, ~shuffled).tolist()))
    null = permutation_null([scores], [labels], draws=600, seed=1)
    drawn = {tuple(round(v, 9) for v in row) for row in null.tolist()}
    assert drawn == possible  # every one of the 6 shuffles appears, nothing else
    assert null.mean() == pytest.approx(0.5, abs=0.03)


def test_permutation_null_is_seeded_and_bounds_heads_that_are_pure_noise():
    rng = np.random.default_rng(0)
    labels = [[E, R, E, R, R, E][: 3 + i % 4] for i in range(80)]
    scores = [torch.tensor(rng.random((64, len(lab)))) for lab in labels]  # 64 heads, every one random
    null = permutation_null(scores, labels, draws=400, seed=3)
    assert np.array_equal(null, permutation_null(scores, labels, draws=400, seed=3))
    assert not np.array_equal(null, permutation_null(scores, labels, draws=400, seed=4))
    sra = per_trace_auc(scores, labels)[0].mean(dim=0).numpy()
    head_p95, best_p95 = np.quantile(null, 0.95), np.quantile(null.max(axis=1), 0.95)
    assert abs(null.mean() - 0.5) < 0.005
    assert (sra > head_p95).mean() <= 0.15  # about 5% of noise heads pass the one-head threshold
    assert head_p95 < sra.max() <= best_p95  # the best of 64 noise heads passes the first, not the second
    informative = [torch.cat([s, torch.tensor([[1.0 if lab == E else 0.0 for lab in labs]])]) for s, labs in zip(scores, labels)]
    assert per_trace_auc(informative, labels)[0].mean(dim=0)[-1] == 1.0 > best_p95


def test_split_half_reliability_of_a_ranking_every_trace_agrees_on():
    auc = torch.tensor([[0.9, 0.7, 0.5, 0.3]] * 6 + [[0.8, 0.6, 0.4, 0.2]] * 6, dtype=torch.float64)
    result = split_half_reliability(auc, top_n=2, seed=0)
    assert result["spearman"] == pytest.approx(1.0) and result["top_n_overlap"] == 2 and result["traces"] == [6, 6]
    assert split_half_reliability(auc[:1], top_n=2) is None
    noisy = torch.rand(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert split_half_reliability(noisy, 3, seed=5) == split_half_reliability(noisy, 3, seed=5)


def test_sweep_writes_version_2_with_controls_baselines_and_reliability(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["sweep", "--model", str(tiny_model_dir), "--traces", str(labeled_trace_file), "--out", str(out),
                 "--quiet", "--permutations", "200"]) == 0
    manifest = load_manifest(out)
    assert manifest["version"] == 2 and validate_manifest(manifest) == []
    probe = manifest["probe"]
    # trace 1: E R R (2 after-pairs); trace 2: E R R E (2 after, 2 before)
    assert (probe["pairs_redundant_after"], probe["pairs_redundant_before"]) == (4, 2)
    assert (probe["traces_redundant_after"], probe["traces_redundant_before"]) == (2, 1)
    assert probe["reliability"]["traces"] == [1, 1] and probe["permutation_draws"] == 200
    for head in manifest["heads"]:
        lo, hi = head["sra_redundant_after_ci95"]
        assert lo <= head["sra_redundant_after"] <= hi
    assert manifest["baselines"]["position_later"]["sra"] == pytest.approx(0.25)  # E R R: 0; E R R E: 2 of 4 pairs
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    table = capsys.readouterr().out
    assert "R after  R before" in table and "permutation null (200 draws)" in table and "position, later higher" in table
    png = tmp_path / "two.png"
    assert main(["plot", str(out), "--out", str(png), "--redundant-after"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    broken = json.loads(out.read_text())
    del broken["baselines"], broken["heads"][0]["sra_redundant_before"]
    assert {p.split(":")[0] for p in validate_manifest(broken)} >= {"missing field 'baselines'", "heads[0]"}


def test_version_1_manifests_stay_readable_by_show_compare_validate_plot_and_the_trainer(tmp_path, capsys):
    from attnpo_train.config import TrainConfig
    from attnpo_train.loop import prepare_run
    from kfh_probe.organism import default_manifest_path, default_model_dir

    assert load_manifest(V1_MANIFEST)["version"] == 1
    assert main(["validate", str(V1_MANIFEST)]) == 0
    assert main(["show", str(V1_MANIFEST), "--rows", "3"]) == 0
    assert "version-1 manifest" in capsys.readouterr().out
    assert main(["compare", str(V1_MANIFEST), str(default_manifest_path()), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spearman"] == pytest.approx(1.0)  # same sweep, new schema
    assert main(["plot", str(V1_MANIFEST), "--out", str(tmp_path / "v1.png")]) == 0
    assert main(["plot", str(V1_MANIFEST), "--out", str(tmp_path / "no.png"), "--redundant-after"]) == 2
    assert "no per-head 'sra_redundant_after'" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
    inputs = prepare_run(TrainConfig(model=str(default_model_dir()), manifest=str(V1_MANIFEST), method="attnpo", out=str(tmp_path)))
    assert inputs.strategy.heads == [(1, 4), (1, 5), (1, 2), (1, 7), (2, 3)]
