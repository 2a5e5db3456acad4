"""The benchmark scripts take their real-size flags and run end to end on a CPU at small sizes: each exits 0 and
prints its table; ``bench_capture.py`` marks eager rows whose T x T maps cannot fit instead of stopping;
``gpu_check.py --tiny`` writes its one JSON with every part and goal. (Speed is never asserted.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 900) -> str:
    """Run ``benchmarks/NAME`` with ``args``; its stdout, after checking it exited 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def bench_capture():
    spec = importlib.util.spec_from_file_location("bench_capture", BENCHMARKS / "bench_capture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_capture_runs_with_dtype_layers_and_batch_and_prints_its_table(tmp_path):
    out = run_script("bench_capture.py", "--layers", "1", "--lengths", "32", "--vocab", "512", "--repeats", "1",
                     "--dtype", "bfloat16", "--batch", "2", "--json", str(tmp_path / "rows.json"))
    header, columns, row = out.splitlines()[:3]
    assert "1 layers" in header and "bfloat16; batch 2" in header
    assert columns.split()[:5] == ["T", "|", "plain", "s", "rows"] and row.split()[:2] == ["32", "|"]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["method"], r["batch"], r["layers"], r["dtype"]) for r in rows] == \
        [(m, 2, 1, "bfloat16") for m in ("plain", "rows", "eager")]
    assert all(r["seconds"] > 0 for r in rows)


def test_bench_capture_marks_eager_maps_that_cannot_fit_without_building_the_model():
    row = bench_capture().child("eager", 32768, 1, 512, "cpu", layers=28, dtype="bfloat16")
    assert row["skipped"].startswith("its T x T maps need 720.0 GiB")  # 28 x 12 x 32768^2 x 2 bytes + a float32 layer
    assert "seconds" not in row


def test_bench_capture_refuses_lengths_beyond_the_context():
    with pytest.raises(SystemExit):
        bench_capture().parse_args(["--lengths", "4096", "65536"])


@pytest.mark.slow
def test_bench_scoring_runs_with_dtype_layers_and_checkpointing_and_prints_its_table(tmp_path):
    out = run_script("bench_scoring.py", "--models", "r1shape", "--repeats", "1", "--tokens", "160", "--group-size", "2",
                     "--vocab", "539", "--layers", "5", "--dtype", "bfloat16", "--gradient-checkpointing",
                     "--json", str(tmp_path / "scoring.json"))
    assert "r1shape: 2 responses" in out and "bfloat16, gradient checkpointing" in out
    assert "update s: tlmre" in out and "max |fused - unfused| per-token advantage" in out
    row = json.loads((tmp_path / "scoring.json").read_text())["r1shape"]
    assert (row["dtype"], row["gradient_checkpointing"]) == ("bfloat16", True)
    assert row["max_abs_advantage_diff"] <= 1e-6


@pytest.mark.slow
def test_gpu_check_runs_every_part_at_the_tiny_shape_on_a_cpu_and_writes_its_json(tmp_path):
    out = run_script("gpu_check.py", "--tiny", "--device", "cpu", "--out", str(tmp_path / "check.json"), timeout=1500)
    report = json.loads((tmp_path / "check.json").read_text())
    assert (report["format"], report["version"], report["tiny"], report["device_name"]) == ("kfh-gpu-check", 1, True, "cpu")
    trl = importlib.util.find_spec("trl") is not None
    assert {name: part["status"] for name, part in report["parts"].items()} == \
        {"capture": "ok", "scoring": "ok", "train": "ok", "sweep": "ok", "trl": "ok" if trl else "skipped"}
    parts = report["parts"]
    assert {(r["method"], r["T"]) for r in parts["capture"]["result"]["rows"]} == \
        {(m, t) for m in ("plain", "rows", "hf") for t in (64, 128)}
    assert [m["step"] for m in parts["train"]["result"]["metrics"]] == [1, 2]
    assert set(parts["sweep"]["result"]) == {"float32", "bfloat16"}
    assert not trl or len(parts["trl"]["result"]["steps"]) == 2
    assert [g["value"] is not None and g["met"] in (True, False) for g in report["goals"]] == [True] * 3
    assert "wrote" in out and out.count("goal:") == 3


@pytest.mark.slow
def test_bench_train_step_runs_each_precision_setting_and_prints_ratios_to_float32(tmp_path):
    out = run_script("bench_train_step.py", "--steps", "1", "--rounds", "1", "--prompts", "1", "--group-size", "2",
                     "--max-new-tokens", "16", "--settings", "bfloat16+gc", "float16", "--json", str(tmp_path / "steps.json"))
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["setting", "|", "rollout"]
    assert [line.split()[0] for line in lines[2:]] == ["float32", "bfloat16+gc", "float16"]
    results = json.loads((tmp_path / "steps.json").read_text())
    assert results["float32"]["over_float32"] == 1.0 and results["float16"]["step_s"] > 0
