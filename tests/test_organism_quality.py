"""The shipped organism: a plain HF folder that solves its task and overthinks when sampled."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from kfh_probe.organism import default_model_dir
from kfh_probe.organism.report import REPORT_SEED, labeled_samples
from kfh_probe.organism.traces import sample_labeled_traces

MODEL = default_model_dir()  # committed: a missing folder fails these tests


def test_shipped_folder_is_small_and_loads_with_no_flags():
    assert sum(p.stat().st_size for p in MODEL.iterdir()) <= 10 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(str(MODEL))
    assert model.config.model_type == "qwen2"
    assert model.config.num_key_value_heads < model.config.num_attention_heads


@pytest.mark.slow
def test_greedy_accuracy_on_fresh_problems_is_at_least_95_percent_and_greedy_still_overthinks():
    stats = labeled_samples(MODEL, 200, REPORT_SEED + 7, temperature=None)[1]
    assert stats["accuracy"] >= 0.95, stats
    assert 0.2 <= stats["other_block_fraction"] <= 0.8, stats  # some greedy responses work the other block
    assert stats["rechecks_mean"] > 0, stats  # and some re-check
    assert stats["missing_essential_mean"] <= 0.05, stats


@pytest.mark.slow
def test_sampling_stays_accurate_and_spreads_lengths_and_redundancy():
    stats = labeled_samples(MODEL, 200, REPORT_SEED + 8, temperature=1.0)[1]
    assert stats["accuracy"] >= 0.80, stats
    assert stats["tokens_std"] >= 0.15 * stats["tokens_mean"], stats
    assert stats["redundant_steps_mean"] >= 1.0, stats
    assert stats["parseable_fraction"] >= 0.95, stats
    # the redundancy varies from sample to sample, so RL has short and long correct responses to compare
    assert 0.2 <= stats["other_block_fraction"] <= 0.8, stats
    assert stats["minimal_fraction"] >= 0.10, stats
    assert stats["rechecks_mean"] > 0 and stats["restates_mean"] > 0, stats
    assert 0 < stats["recheck_open_p"] < 1, stats


@pytest.mark.slow
def test_sampled_traces_are_design_format_records_with_both_labels():
    records = sample_labeled_traces(MODEL, 24, seed=REPORT_SEED + 9)
    assert len(records) >= 22
    labels = set()
    for r in records:
        assert "".join(s["text"] for s in r["steps"]) == r["response"].split("</think>")[0]
        labels |= {s["label"] for s in r["steps"]}
    assert labels == {"essential", "redundant"}


def _default_sweep(tmp_path):
    from kfh_probe.cli import main
    from kfh_probe.manifest import load_manifest

    out = tmp_path / "manifest.json"
    assert main(["sweep", "--out", str(out), "--quiet"]) == 0  # the project's main job: no --model, no --traces
    return out, load_manifest(out)


@pytest.mark.slow
def test_main_job_reproduces_the_shipped_manifest(tmp_path):
    from kfh_probe.organism import default_manifest_path

    out, manifest = _default_sweep(tmp_path)
    assert manifest["model"]["name_or_path"] == "kfh-organism"
    assert manifest["probe"]["traces_used"] >= 290
    assert out.read_bytes() == default_manifest_path().read_bytes()


@pytest.mark.slow
def test_sweep_on_sampled_traces_finds_a_head_above_090_with_most_heads_far_lower(tmp_path):
    import statistics

    _, manifest = _default_sweep(tmp_path)
    sras = [h["sra"] for h in manifest["heads"]]
    assert sras[0] >= 0.90, sras
    assert statistics.median(sras) <= sras[0] - 0.2, sras
