"""The AttnPO experiment's scripts run end to end at a tiny size: the arms, step budgets, paired differences,
resuming from finished runs, and the re-sweep of trained policies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfh_probe.organism import default_manifest_path, default_model_dir

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_the_experiment_evaluates_step_budgets_pairs_seeds_and_resumes(tmp_path):
    out, summary = tmp_path / "runs", tmp_path / "summary.json"
    args = ["--organism", "v5", "--arms", "tlmre", "oracle", "pos_only", "--seeds", "0", "1", "--few-seeds", "1",
            "--steps", "2", "--budgets", "1", "--prompts-per-step", "1", "--group-size", "2", "--eval-n", "2",
            "--eval-samples", "2", "--budget-samples", "1", "--workers", "1", "--out", str(out),
            "--json", str(summary), "--plot", str(tmp_path / "curves.png")]
    first = script("attnpo_vs_tlmre.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads(summary.read_text(encoding="utf-8"))
    assert record["partial"] is False and record["runs_planned"] == 5
    assert sorted((r["arm"], r["seed"]) for r in record["runs"]) == [
        ("oracle", 0), ("oracle", 1), ("pos_only", 0), ("tlmre", 0), ("tlmre", 1)]
    assert record["summary"]["pos_only"]["t1.0"]["seeds"] == [0]
    assert record["paired_vs_tlmre"]["oracle"]["t0.6"]["seeds"] == [0, 1]
    tokens = record["paired_vs_tlmre"]["oracle"]["t0.6"]["tokens"]
    assert tokens["ci95"][0] <= tokens["mean"] <= tokens["ci95"][1] and len(tokens["diffs"]) == 2
    assert sorted(record["budgets"]) == ["1", "2"]
    assert record["budgets"]["1"]["summary"]["tlmre"]["t0.6"]["seeds"] == [0, 1]
    assert record["budgets"]["2"]["summary"]["tlmre"]["t0.6"]["tokens"] == record["summary"]["tlmre"]["t0.6"]["tokens"]
    assert (out / "tlmre-seed0" / "budget-1.json").is_file()
    curves = record["runs"][0]["curves"]
    assert len(curves["boundary_redundant_corr"]) == 2 and "redundant_in_positive_share" in curves
    written = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")}
    again = script("attnpo_vs_tlmre.py", *args)  # every run is cached: the same summary, nothing rewritten
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(summary.read_text(encoding="utf-8"))["summary"] == record["summary"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")} == written


def test_an_untrained_policy_resweeps_to_the_manifest_it_started_from(tmp_path):
    (tmp_path / "runs" / "tlmre-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "tlmre-seed0" / "final").symlink_to(default_model_dir("v5"))
    result = script("resweep_policies.py", "--organism", "v5", "--out", str(tmp_path / "runs"), "--arms", "tlmre",
                    "--json", str(tmp_path / "heads.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "heads.json").read_text(encoding="utf-8"))
    initial = json.loads(default_manifest_path("v5").read_text(encoding="utf-8"))
    run = record["arms"]["tlmre"]["runs"]["tlmre-seed0"]
    assert run["compare"]["spearman"] == pytest.approx(1.0)
    assert run["compare"]["top_overlap"] == initial["top_n"]
    assert run["best_sra"] == initial["heads"][0]["sra"]
    assert (tmp_path / "runs" / "tlmre-seed0" / "resweep.json").is_file()
    missing = script("resweep_policies.py", "--out", str(tmp_path / "runs"), "--arms", "attnpo", "--json",
                     str(tmp_path / "x.json"))
    assert missing.returncode != 0 and "no finished attnpo run" in missing.stderr


@pytest.mark.slow
def test_the_distillation_experiment_summarises_its_arms_and_resumes(tmp_path):
    args = ["--arms", "ce", "mol", "--seeds", "0", "1", "--steps", "2", "--batch-size", "2", "--train-traces", "4",
            "--eval-n", "2", "--eval-samples", "1", "--eval-every", "1", "--curve-problems", "2",
            "--max-new-tokens", "40", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "distill.json"),
            "--plot", str(tmp_path / "distill.png")]
    first = script("distill.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / "distill.json").read_text(encoding="utf-8"))
    mol = record["summary"]["mol"]
    assert mol["seeds"] == [0, 1] and len(mol["accuracy_greedy_ci95"]) == 2 and 0 <= mol["best_head_sra"] <= 1
    assert (tmp_path / "distill.png").stat().st_size > 0
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/result.json")}
    assert len(written) == 4
    again = script("distill.py", *args)  # every run is cached: nothing is trained or rewritten
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/result.json")} == written
